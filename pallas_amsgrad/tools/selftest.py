"""`pallas-amsgrad selftest`: the accelerator lane in one command.

On whatever device this process sees, it runs the tests that judge the
compiled kernel there (on CPU: the interpreted one), then `verify`, then
`bench`, and writes everything into one folder:

    machine.json           the environment and every device (kind, compute
                           capability, platform version), the default
                           implementation chosen on this device
    tests.xml, tests.log   pytest's JUnit report and output
    verify.json, verify.log
    bench.json, bench.png, bench.log
    summary.json           each stage's exit status and counts

Every stage runs even when one before it failed; the exit status is 1 if any
failed. The tests come from the source checkout (`tests/` beside the
package), so run it from the working tree, installed or with `PYTHONPATH=.`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree

import jax
import numpy as np

from pallas_amsgrad import _implementations
from pallas_amsgrad.tools.environment import environment

# What judges a compiled kernel on its device: kernel vs spec over param
# dtype x mu_dtype and edge shapes, NaN/Inf, output dtypes; the same bits
# across block sizes and runs; donated buffers reused in place; one kernel
# launch per dtype group (the lowering checks); stochastic rounding's bits;
# the API and its errors.
LANE_TESTS = (
    "tests/test_spec.py",
    "tests/test_implementations.py",
    "tests/test_stochastic_rounding.py",
    "tests/test_properties.py",
    "tests/test_in_place.py",
    "tests/test_lowering.py",
    "tests/test_device_choice.py",
    "tests/test_api.py",
    "tests/test_errors.py",
)
# `--quick`: one case of each kind, to show the lane works end to end.
QUICK_TESTS = (
    "tests/test_implementations.py::test_edge_shapes[pallas-(17, 130)-bfloat16]",
    "tests/test_properties.py::test_donated_arrays_are_reused[pallas]",
    "tests/test_lowering.py::test_lowers_with_every_state_array_aliased"
    "[cuda-float32-mu=None-step]",
)
# docs/bench.md's GPU tables: 1M to 256M parameters and the model-shaped trees.
BENCH_SIZES = "1M,4M,16M,64M,256M"
QUICK_BENCH_SIZES = "64K"


def checkout() -> pathlib.Path:
    """The source checkout the package runs from; raises if it has no tests."""
    root = pathlib.Path(__file__).resolve().parents[2]
    if not (root / "tests" / "conftest.py").is_file():
        raise FileNotFoundError(
            f"no tests/ beside the package at {root}: selftest runs from a "
            "source checkout (pip install -e . there, or PYTHONPATH=.)"
        )
    return root


def describe_devices() -> list[dict]:
    described = []
    for device in jax.devices():
        target = _implementations.Target.of(device)
        described.append(
            {
                "id": device.id,
                "platform": target.platform,
                "device_kind": target.device_kind,
                "compute_capability": (
                    None
                    if target.compute_capability is None
                    else ".".join(map(str, target.compute_capability))
                ),
                "platform_version": str(getattr(device.client, "platform_version", "")),
                "default_implementation": _implementations.implementation_for(
                    device
                ).name,
            }
        )
    return described


def _run_stage(name: str, argv: list[str], out: pathlib.Path, cwd) -> dict:
    """Runs `argv`, its output to the console and `out/name.log`."""
    print(f"== {name}: {' '.join(argv)}", flush=True)
    start = time.perf_counter()
    with open(out / f"{name}.log", "w") as log:
        process = subprocess.Popen(
            argv,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        for line in process.stdout:
            sys.stdout.write(line)
            log.write(line)
        returncode = process.wait()
    seconds = round(time.perf_counter() - start, 1)
    print(f"== {name}: exit {returncode} after {seconds} s", flush=True)
    return {"exit_status": returncode, "seconds": seconds}


def _junit_counts(path: pathlib.Path) -> dict:
    """Totals and failing test ids from pytest's JUnit XML."""
    if not path.is_file():
        return {}
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {
        key: sum(int(s.get(key, 0)) for s in suites)
        for key in ("tests", "failures", "errors", "skipped")
    }
    counts["failed"] = [
        "::".join(filter(None, (case.get("classname"), case.get("name"))))
        for suite in suites
        for case in suite.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    return counts


def _quick_params(path: pathlib.Path) -> None:
    rng = np.random.default_rng(0)
    np.savez(
        path,
        w=rng.normal(0, 0.05, (9, 130)).astype(np.float32),
        b=rng.normal(0, 0.05, (3,)).astype(np.float32),
    )


def selftest(out: pathlib.Path, *, quick: bool, tests: bool, torch: bool) -> int:
    """Runs the lane into `out`; returns the exit status (0: every stage
    passed)."""
    out.mkdir(parents=True, exist_ok=True)
    machine = {"environment": environment(), "devices": describe_devices()}
    (out / "machine.json").write_text(json.dumps(machine, indent=2))
    print(json.dumps(machine, indent=2), flush=True)
    python = [sys.executable]
    cli = [*python, "-m", "pallas_amsgrad.tools.cli"]
    stages = {}
    if tests:
        root = checkout()
        stages["tests"] = _run_stage(
            "tests",
            [
                *python,
                "-m",
                "pytest",
                "-p",
                "no:cacheprovider",
                "-q",
                f"--junitxml={(out / 'tests.xml').resolve()}",
                *(QUICK_TESTS if quick else LANE_TESTS),
            ],
            out,
            cwd=root,
        )
        stages["tests"] |= _junit_counts(out / "tests.xml")

    verify = [*cli, "verify", "--json", str((out / "verify.json").resolve())]
    if quick:
        _quick_params(out / "quick_params.npz")
        verify += ["--steps", "1", "--params", str(out / "quick_params.npz")]
    else:  # On the device, the whole grid.
        verify.append("--full")
    stages["verify"] = _run_stage("verify", verify, out, cwd=None)
    if (out / "verify.json").is_file():
        verified = json.loads((out / "verify.json").read_text())
        stages["verify"] |= {
            "rows": len(verified["rows"]),
            "failed": verified["failed"],
        }

    png = out / "bench.png" if importlib.util.find_spec("matplotlib") else ""
    bench = [*cli, "bench", "--json", str((out / "bench.json").resolve())]
    bench += ["--png", str(png and png.resolve())]
    bench += (
        ["--sizes", QUICK_BENCH_SIZES, "--models", "", "--rounds", "2"]
        if quick
        else ["--sizes", BENCH_SIZES]
    )
    if not torch:
        bench.append("--no-torch")
    stages["bench"] = _run_stage("bench", bench, out, cwd=None)

    failed = [name for name, stage in stages.items() if stage["exit_status"] != 0]
    summary = {"quick": quick, "stages": stages, "failed_stages": failed}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {out}/: {', '.join(sorted(p.name for p in out.iterdir()))}")
    print("selftest: " + (f"FAILED ({', '.join(failed)})" if failed else "passed"))
    return 1 if failed else 0
