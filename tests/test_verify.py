"""`pallas-amsgrad verify`: the table, the exit status, and that it can fail."""

from __future__ import annotations

import dataclasses
import json
from typing import ClassVar

import numpy as np
import pytest

import pallas_amsgrad
from pallas_amsgrad import _math
from pallas_amsgrad.tools import cli, verify


def small_params():
    rng = np.random.default_rng(0)
    return {
        "w": rng.normal(0, 0.05, (9, 130)).astype(np.float32),
        "b": np.zeros(3, np.float32),
    }


def test_cli_prints_table_and_exits_zero(monkeypatch, capsys):
    monkeypatch.setattr(verify, "default_params", lambda: small_params())
    assert cli.main(["verify", "--steps", "3"]) == 0
    out = capsys.readouterr().out
    rows = [
        line
        for line in out.splitlines()
        if line.split()[:1] in (["float32"], ["bfloat16"], ["float16"])
    ]
    # 3 param dtypes x 4 mu_dtypes x (pallas, xla, optax).
    assert len(rows) == 36
    assert "FAIL" not in out and out.rstrip().endswith("36 passed, 0 failed")


def test_progress_on_stderr_as_rows_stream(monkeypatch, capsys):
    monkeypatch.setattr(verify, "default_params", small_params)
    streamed = []
    real_format_row = verify.format_row

    def format_row(row):
        # Each row is printed while the run goes on, after the rows before it.
        streamed.append(capsys.readouterr())
        return real_format_row(row)

    monkeypatch.setattr(verify, "format_row", format_row)
    assert cli.main(["verify", "--steps", "1"]) == 0
    assert len(streamed) == 36
    assert streamed[0].out.startswith("pallas-amsgrad verify on cpu")
    assert "[1/12] float32 params, mu_dtype param; 0.0 s elapsed" in streamed[0].err
    # Three rows (pallas, xla, optax) per configuration.
    assert "[12/12] float16 params, mu_dtype float32" in streamed[33].err


def test_every_row_compares_values():
    """No row passes vacuously: float16 rows draw gradients in float16's
    normal range, so optax's values are compared there too."""
    rows = verify.verify(params=small_params(), steps=3)
    for row in rows:
        assert row.compared > row.left_out, row
        assert row.passed, row


def test_a_row_that_compared_nothing_fails():
    row = verify._row("float16", None, "optax", verify._Worst(left_out=5))
    assert not row.passed and row.compared == 0
    assert "no values compared" in row.note
    assert "FAIL" in verify.format_row(dataclasses.asdict(row))


@dataclasses.dataclass(frozen=True)
class WrongB1:
    """The XLA path run with b1 = 0.85 whatever the optimizer was given."""

    name: ClassVar[str] = "wrong-b1"

    def __call__(self, coefficients, leaves, *, out_dtypes, operands):
        wrong = _math.Coefficients.unpack(coefficients)._replace(
            b1=0.85, one_minus_b1=0.15
        )
        return pallas_amsgrad.Xla()(
            wrong.pack(coefficients.dtype),
            leaves,
            out_dtypes=out_dtypes,
            operands=operands,
        )


def test_disagreement_fails():
    """A contender with a wrong b1 fails every one of its rows."""
    rows = verify.verify(params=small_params(), steps=2, implementations=(WrongB1(),))
    failed = [r for r in rows if r.contender == "wrong-b1" and not r.passed]
    assert len(failed) == 12


def test_json_report_of_a_users_npz(tmp_path, capsys):
    path = tmp_path / "params.npz"
    np.savez(path, **small_params())
    assert (
        cli.main(["verify", "--steps", "2", "--params", str(path), "--json", "-"]) == 0
    )
    run = json.loads(capsys.readouterr().out)
    assert run["inputs"]["params"] == str(path)
    assert run["inputs"]["parameters"] == 9 * 130 + 3
    assert run["failed"] == 0 and run["passed"] == len(run["rows"]) == 36
    assert {r["contender"] for r in run["rows"]} == {"pallas", "xla", "optax"}
    for key in ("jax", "jaxlib", "optax", "backend", "devices", "pallas_amsgrad"):
        assert run["environment"][key]


def test_json_file_beside_the_table(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(verify, "default_params", small_params)
    out = tmp_path / "verify.json"
    assert cli.main(["verify", "--steps", "1", "--json", str(out)]) == 0
    assert "36 passed, 0 failed" in capsys.readouterr().out
    assert json.loads(out.read_text())["passed"] == 36


def test_npz_with_an_integer_leaf_is_refused(tmp_path):
    path = tmp_path / "params.npz"
    np.savez(path, w=np.ones(3, np.float32), step=np.arange(3))
    with pytest.raises(ValueError, match="leaf 'step' has dtype int64"):
        verify.load_params(str(path))
