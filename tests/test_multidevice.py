"""The sharded step on 8 CPU devices, and on 2 processes of 4 devices each.

Both need a device count fixed before jax starts, so each runs in processes of
its own; this process keeps its single device (the unsharded reference).
"""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys

import distributed_worker
import jax
import numpy as np
import pytest
import tolerances

TESTS = pathlib.Path(__file__).parent
# Generous bounds on 2 cores; the runs take about a tenth of them.
LANE_TIMEOUT_S = 900
PROCESSES_TIMEOUT_S = 300


def _env(devices: int) -> dict[str, str]:
    flags = os.environ.get("XLA_FLAGS", "")
    return dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={devices}",
    )


@pytest.mark.slow
def test_eight_device_lane():
    """tests/multidevice/, in a process with 8 CPU devices. One process: the
    suite runs its slow tests first (conftest.py), so the lane's minutes
    overlap the rest of the suite instead of ending it."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "multidevice"],
        cwd=TESTS,
        env=_env(8),
        capture_output=True,
        text=True,
        timeout=LANE_TIMEOUT_S,
    )
    print(result.stdout[-4000:])
    assert result.returncode == 0, result.stdout[-12000:] + result.stderr[-4000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("implementation", ["pallas", "xla"])
def test_two_processes_on_one_global_mesh_equal_one_process(implementation, tmp_path):
    """Two processes joined by jax.distributed on the loopback address, 4 CPU
    devices each, step on one (4, 2) mesh of all 8; their shards, put together,
    equal this process's unsharded step bit for bit."""
    port = _free_port()
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                str(TESTS / "distributed_worker.py"),
                f"--process-id={process_id}",
                f"--port={port}",
                f"--implementation={implementation}",
                f"--out={tmp_path / f'process{process_id}.npz'}",
            ],
            env=_env(distributed_worker.LOCAL_DEVICES),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for process_id in range(distributed_worker.PROCESSES)
    ]
    logs = []
    try:
        for worker in workers:
            logs.append(worker.communicate(timeout=PROCESSES_TIMEOUT_S)[0])
    finally:
        for worker in workers:
            worker.kill()
    for worker, log in zip(workers, logs, strict=True):
        assert worker.returncode == 0, log[-8000:]

    expected = distributed_worker.train(implementation, jax.devices()[:1])
    shards = [np.load(tmp_path / f"process{i}.npz") for i in range(len(workers))]
    actual = distributed_worker.assemble(expected, shards)
    tolerances.assert_trees_equal(actual, expected)
