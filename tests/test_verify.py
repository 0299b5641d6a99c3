"""`pallas-amsgrad verify`: the table, the exit status, and that it can fail."""

from __future__ import annotations

import numpy as np

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
