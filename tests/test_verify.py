"""`pallas-amsgrad verify`: the table, the exit status, and that it can fail."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import pathlib
import subprocess

import numpy as np
import pytest

import pallas_amsgrad
from pallas_amsgrad import _math, _quantization
from pallas_amsgrad.tools import cli, environment, verify


def small_params():
    rng = np.random.default_rng(0)
    return {
        # 4160 elements: 8-bit rows quantize it (one tail block per row).
        "w": rng.normal(0, 0.05, (32, 130)).astype(np.float32),
        "b": np.zeros(3, np.float32),
    }


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """One `verify --steps 3 --params PARAMS.npz --json PATH` (the quick
    default grid) on a user's small params, shared by the checks of its
    output: (exit status, stdout, the JSON report, the npz's path)."""
    folder = tmp_path_factory.mktemp("verify")
    path, params = folder / "verify.json", folder / "params.npz"
    np.savez(params, **small_params())
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        status = cli.main(
            ["verify", "--steps", "3", "--params", str(params), "--json", str(path)]
        )
    return status, stdout.getvalue(), json.loads(path.read_text()), params


def test_cli_prints_table_and_exits_zero(cli_run):
    status, out, *_ = cli_run
    assert status == 0
    rows = [
        line
        for line in out.splitlines()
        if line.split()[:1] in (["float32"], ["bfloat16"], ["float16"])
    ]
    # 3 param dtypes with their default mu_dtype x (pallas, xla, optax), the
    # recipe with float32 params (and optax's composition), bfloat16 mu, nu
    # and nu_max for float32 params (no optax), and stochastic rounding of
    # bfloat16 params and state (no optax).
    assert out.startswith("pallas-amsgrad verify (quick: 7 of 24 configurations")
    assert len(rows) == 9 + 3 + 2 + 2 + 2  # And 8-bit state (no optax).
    assert {row.split()[0] for row in rows} == set(verify.PARAM_DTYPES)
    assert sum(" recipe " in row for row in rows) == 3
    assert sum(row.split()[3] == "sr" for row in rows) == 2
    assert sum(row.split()[2] == "bfloat16" for row in rows) == 2
    eight_bit = [row for row in rows if row.split()[1:3] == ["int8", "uint8"]]
    assert len(eight_bit) == 2 and all("8-bit codes" in row for row in eight_bit)
    assert "FAIL" not in out and out.rstrip().endswith("18 passed, 0 failed")


def test_json_file_beside_the_table(cli_run):
    _, out, run, params = cli_run
    assert "18 passed, 0 failed" in out
    assert run["passed"] == len(run["rows"]) == 18
    assert run["inputs"]["grid"] == "quick"
    assert len(run["inputs"]["configurations"]) == 7
    assert run["inputs"]["params"] == str(params)
    assert run["inputs"]["parameters"] == 32 * 130 + 3
    assert {r["contender"] for r in run["rows"]} == {"pallas", "xla", "optax"}
    for key in ("jax", "jaxlib", "optax", "backend", "devices", "pallas_amsgrad"):
        assert run["environment"][key]
    # The result names the commit of the package it ran.
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"],
        cwd=pathlib.Path(pallas_amsgrad.__file__).parent,
        capture_output=True,
        text=True,
    )
    if head.returncode == 0:  # A checkout, as in CI's fresh clone.
        assert run["environment"]["commit"] == head.stdout.strip()
        assert isinstance(run["environment"]["dirty"], bool)
        assert f"commit {head.stdout.strip()[:7]}" in out.splitlines()[0]


def test_a_tree_copied_without_git_names_the_commit_it_was_given(monkeypatch):
    monkeypatch.setattr(environment, "_git", lambda *args: None)
    monkeypatch.setenv(environment.COMMIT_VARIABLE, "0123456789abcdef")
    env = environment.environment()
    assert (env["commit"], env["dirty"]) == ("0123456789abcdef", None)
    assert environment.describe_revision(env) == "commit 0123456"
    monkeypatch.delenv(environment.COMMIT_VARIABLE)
    assert environment.environment()["commit"] == "unknown"
    assert environment.describe_revision({}) == "commit unknown"


def test_every_row_compares_values(cli_run):
    """No row passes vacuously: float16 rows draw gradients in float16's
    normal range, so optax's values are compared there too."""
    for row in cli_run[2]["rows"]:
        assert row["compared"] > row["left_out"], row
        assert row["passed"], row


@pytest.mark.slow
def test_full_grid_fails_a_wrong_contender_streaming_rows_in_order(monkeypatch, capsys):
    """`--full` runs every configuration; a contender with a wrong b1 fails
    every one of its rows (optax's pass) and the command exits 1. Each row is
    printed as the run goes on, right after its configuration's progress line
    (one job)."""
    monkeypatch.setattr(verify, "default_params", lambda full: small_params())
    monkeypatch.setattr(verify, "IMPLEMENTATIONS", (WRONG_B1,))
    streamed = []
    real_format_row = verify.format_row

    def format_row(row):
        streamed.append((row, capsys.readouterr()))
        return real_format_row(row)

    monkeypatch.setattr(verify, "format_row", format_row)
    assert cli.main(["verify", "--full", "--steps", "2", "--jobs", "1"]) == 1
    configurations = verify.CONFIGURATIONS
    assert len(configurations) == 24
    assert streamed[0][1].out.startswith(
        "pallas-amsgrad verify (the full grid, 24 configurations) on cpu"
    )
    rows = [row for row, _ in streamed]
    assert [r["contender"] for r in rows if r["contender"] != "optax"] == [
        "wrong-b1"
    ] * 24
    assert not any(r["passed"] for r in rows if r["contender"] == "wrong-b1")
    assert all(r["passed"] for r in rows if r["contender"] == "optax")
    first_row = 0
    for number, config in enumerate(configurations, 1):
        progress = streamed[first_row][1].err
        assert f"[{number}/24] {config.describe()};" in progress
        first_row += 1 + config.with_optax
    assert first_row == len(rows)
    summary = capsys.readouterr().out.rstrip()
    assert summary.endswith(f"{sum(r['passed'] for r in rows)} passed, 24 failed")


def test_the_quick_run_takes_one_leaf_of_each_kind():
    full, quick = verify.default_params(), verify.default_params(full=False)
    assert list(quick) == list(verify.QUICK_LEAVES)
    for name, leaf in quick.items():
        np.testing.assert_array_equal(leaf, full[name])
    shapes = {leaf.shape for leaf in quick.values()}
    assert len(shapes) == len(quick)  # No kind twice.
    assert {len(shape) for shape in shapes} == {0, 1, 2}
    assert verify.default_source(False).endswith("one leaf of each kind")


def test_a_row_that_compared_nothing_fails():
    row = verify._row(
        verify.Configuration("float16", None), "optax", verify._Worst(left_out=5)
    )
    assert not row.passed and row.compared == 0
    assert "no values compared" in row.note
    assert "FAIL" in verify.format_row(dataclasses.asdict(row))


@dataclasses.dataclass(frozen=True)
class XlaWith:
    """The XLA path run with some coefficients replaced, whatever the
    optimizer was given: `overrides` is ((field, value), ...)."""

    name: str
    overrides: tuple

    def __call__(self, coefficients, leaves, *, out_dtypes, operands, streams=None):
        replaced = _math.Coefficients.unpack(coefficients)._replace(
            **dict(self.overrides)
        )
        return pallas_amsgrad.Xla()(
            replaced.pack(coefficients.dtype),
            leaves,
            out_dtypes=out_dtypes,
            operands=operands,
            streams=streams,
        )


WRONG_B1 = XlaWith("wrong-b1", (("b1", 0.85), ("one_minus_b1", 0.15)))
# As if every step's gradients were finite.
NEVER_SKIPS = XlaWith("never-skips", (("accept", 1),))


def test_a_step_that_is_not_skipped_fails_the_recipe_rows():
    """The recipe rows run a step with a NaN gradient, which the finite guard
    skips; a contender that steps anyway fails them, and only them."""
    configurations = verify.QUICK_CONFIGURATIONS + tuple(
        c
        for c in verify.CONFIGURATIONS
        if c.recipe and c not in verify.QUICK_CONFIGURATIONS
    )
    rows = verify.verify(
        params=small_params(),
        steps=2,
        implementations=(NEVER_SKIPS,),
        configurations=configurations,
    )
    failed = {(r.params, r.options) for r in rows if not r.passed}
    assert failed == {(dtype, "recipe") for dtype in verify.PARAM_DTYPES}


def test_8_bit_rows_fail_nu_max_rounded_to_nearest(monkeypatch):
    """The 8-bit rows allow a code one off the spec's only at a rounding
    threshold: a contender that stores nu_max to the nearest code instead of
    up (the maximum could then fall) fails them, and nothing else."""
    monkeypatch.setattr(_quantization, "roundings", lambda operands: ("nearest",) * 3)
    configurations = [c for c in verify.CONFIGURATIONS if c.quantized]
    rows = verify.verify(
        params=small_params(),
        steps=2,
        implementations=("xla",),
        configurations=configurations,
    )
    assert rows and not any(r.passed for r in rows)
    assert all("codes (up) off the spec's" in r.note for r in rows), rows
    assert not any("codes (nearest)" in r.note for r in rows), rows


def test_json_only_on_stdout(monkeypatch, capsys):
    """`--json -` prints the report alone, for piping."""
    monkeypatch.setattr(verify, "default_params", lambda full: small_params())
    monkeypatch.setattr(verify, "QUICK_CONFIGURATIONS", verify.CONFIGURATIONS[:1])
    assert cli.main(["verify", "--steps", "1", "--json", "-"]) == 0
    run = json.loads(capsys.readouterr().out)
    assert run["failed"] == 0 and run["passed"] == len(run["rows"]) == 3


def test_npz_with_an_integer_leaf_is_refused(tmp_path):
    path = tmp_path / "params.npz"
    np.savez(path, w=np.ones(3, np.float32), step=np.arange(3))
    with pytest.raises(ValueError, match="leaf 'step' has dtype int64"):
        verify.load_params(str(path))
