"""`pallas-amsgrad verify`: the table, the exit status, and that it can fail."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pallas_amsgrad import _verify, cli


def small_params():
    rng = np.random.default_rng(0)
    return {
        "w": rng.normal(0, 0.05, (9, 130)).astype(np.float32),
        "b": np.zeros(3, np.float32),
    }


def test_cli_prints_table_and_exits_zero(monkeypatch, capsys):
    monkeypatch.setattr(_verify, "default_params", lambda: small_params())
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


def test_disagreement_fails(monkeypatch):
    """A contender with a wrong b1 fails every one of its rows."""
    real_amsgrad = _verify._transform.amsgrad

    def wrong_b1(learning_rate, **kwargs):
        return real_amsgrad(learning_rate, b1=0.85, **kwargs)

    monkeypatch.setattr(_verify._transform, "amsgrad", wrong_b1)
    rows = _verify.verify(params=small_params(), steps=2, implementations=("xla",))
    failed = [r for r in rows if r.contender == "xla" and not r.passed]
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
    monkeypatch.setattr(_verify, "default_params", small_params)
    out = tmp_path / "verify.json"
    assert cli.main(["verify", "--steps", "1", "--json", str(out)]) == 0
    assert "36 passed, 0 failed" in capsys.readouterr().out
    assert json.loads(out.read_text())["passed"] == 36


def test_npz_with_an_integer_leaf_is_refused(tmp_path):
    path = tmp_path / "params.npz"
    np.savez(path, w=np.ones(3, np.float32), step=np.arange(3))
    with pytest.raises(ValueError, match="leaf 'step' has dtype int64"):
        _verify.load_params(str(path))
