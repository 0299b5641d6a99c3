"""`pallas-amsgrad selftest`, the accelerator lane, run here on CPU.

On CPU the kernel is interpreted; `--quick` keeps every stage small. One run
has a failing test added to its selection: the lane must report it, still
run verify and bench, and exit 1.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from pallas_amsgrad.tools import cli, selftest

pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_quick_lane_writes_every_result_and_reports_a_failing_test(
    tmp_path, monkeypatch, capsys
):
    failing = tmp_path / "test_planted.py"
    failing.write_text("def test_planted_failure():\n    assert 1 == 2\n")
    monkeypatch.setattr(
        selftest, "QUICK_TESTS", (selftest.QUICK_TESTS[0], str(failing))
    )
    out = tmp_path / "lane"
    assert cli.main(["selftest", "--quick", "--no-torch", "--out", str(out)]) == 1
    assert "selftest: FAILED (tests)" in capsys.readouterr().out

    names = {p.name for p in out.iterdir()}
    assert {
        "machine.json",
        "tests.xml",
        "tests.log",
        "verify.json",
        "verify.log",
        "bench.json",
        "bench.png",
        "bench.log",
        "summary.json",
    } <= names

    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed_stages"] == ["tests"]
    tests = summary["stages"]["tests"]
    assert (tests["tests"], tests["failures"], tests["errors"]) == (2, 1, 0)
    assert [name.split("::")[-1] for name in tests["failed"]] == [
        "test_planted_failure"
    ]
    # verify's quick grid: 3 param dtypes x (pallas, xla, optax), the
    # recipe's 3 rows, the lean state's 2, stochastic rounding's 2 and 8-bit
    # state's 2.
    assert summary["stages"]["verify"] | {"seconds": 0} == {
        "exit_status": 0,
        "seconds": 0,
        "rows": 18,
        "failed": 0,
    }
    assert summary["stages"]["bench"]["exit_status"] == 0
    bench = json.loads((out / "bench.json").read_text())
    assert {c["workload"] for c in bench["cases"]} == {"flat-64K"}

    machine = json.loads((out / "machine.json").read_text())
    assert machine["environment"]["backend"] == "cpu"
    assert machine["devices"][0]["platform"] == "cpu"
    assert machine["devices"][0]["default_implementation"] == "xla"


def test_lane_tests_exist():
    """Every test the lane selects is collected (a renamed test would
    otherwise drop out of the accelerator lane unseen)."""
    collected = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "--collect-only",
            "-q",
            *selftest.LANE_TESTS,
            *selftest.QUICK_TESTS,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert collected.returncode == 0, collected.stdout[-2000:] + collected.stderr


def test_spec_imports_from_the_checkout_without_an_install():
    """`PYTHONPATH=.` in the checkout (the GPU hosts have no package
    registry): `amsgrad_spec` is spec/."""
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import amsgrad_spec, spec; assert amsgrad_spec is spec; "
            "assert amsgrad_spec.update",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
