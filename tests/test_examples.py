"""examples/train_sharded.py runs, and its two columns of losses agree."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

EXAMPLE = pathlib.Path(__file__).parents[1] / "examples" / "train_sharded.py"
ROW = re.compile(r"^\s*(\d+)\s+([-\d.e+]+)\s+([-\d.e+]+)\s*$")


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags",
    [[], ["--explicit", "--implementation", "pallas"]],
    ids=["auto", "explicit-pallas"],
)
def test_train_sharded_example_tracks_optax(flags):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # The example sets its own 8 CPU devices.
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--steps", "12", *flags],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-8000:]
    print(result.stdout)
    lines = result.stdout.splitlines()
    assert lines[0].startswith("8 cpu devices, mesh {'data': 4, 'model': 2}")
    rows = np.array([ROW.match(line).groups() for line in lines[2:-1]], float)
    np.testing.assert_array_equal(rows[:, 0], np.arange(12))
    # Same start, same data: the fused step and optax stay within float32
    # rounding of each other, and both learn.
    np.testing.assert_allclose(rows[:, 1], rows[:, 2], rtol=1e-5)
    assert rows[-1, 1] < 0.8 * rows[0, 1]
    assert "params keep their shardings: True" in lines[-1]
