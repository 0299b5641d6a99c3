"""The suite's 8-device lane: `tests/test_multidevice.py` runs these tests in a
process of their own, started with 8 CPU devices, so that no other test sees
them. To run them directly:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m pytest tests/multidevice
"""

import jax
import pytest

DEVICES = 8


@pytest.fixture(autouse=True)
def _eight_devices():
    if jax.device_count() != DEVICES:
        pytest.fail(
            f"tests/multidevice needs {DEVICES} devices, jax has "
            f"{jax.device_count()}: set XLA_FLAGS="
            f"--xla_force_host_platform_device_count={DEVICES} before jax starts"
        )
