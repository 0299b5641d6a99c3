"""`pallas-amsgrad bench`: bytes, the report files and regression tracking.

Timings themselves are never asserted (shared machines are noisy); the
comparison logic is checked on hand-made runs, and the command end to end on
a tiny workload, including a baseline it must fail against.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
from test_device_choice import A100, CPU, H100, TPU

from pallas_amsgrad.tools import cli, workloads
from pallas_amsgrad.tools.bench import contenders, peaks, report


@pytest.mark.parametrize(
    "dtype, mu_dtype, job, expected",
    [
        # The figures: 36 fused, 44 with a separate apply pass (f32).
        ("float32", None, "step", 36),
        ("float32", None, "update+apply", 44),
        ("float32", None, "update", 32),
        ("bfloat16", None, "step", 18),
        # param, grad, nu, nu_max 4 bytes and mu 2: (4*4 + 2) read, 3*4 + 2 written.
        ("float32", "bfloat16", "step", 32),
    ],
)
def test_min_bytes_per_param(dtype, mu_dtype, job, expected):
    assert contenders.min_bytes_per_param(dtype, mu_dtype, job) == expected


@pytest.mark.parametrize(
    "mu_dtype, job, expected",
    [
        # param, grad 4 bytes each way as needed; mu 4; nu and nu_max 2.
        (None, "step", 28),
        (None, "update", 24),
        (None, "update+apply", 36),
        # docs/bench.md's lean row: 3 float32 arrays and 6 bfloat16 ones.
        ("bfloat16", "step", 24),
    ],
)
def test_min_bytes_per_param_with_16_bit_nu(mu_dtype, job, expected):
    config = contenders.Config("float32", mu_dtype, nu_dtype="bfloat16")
    assert config.min_bytes_per_param(job) == expected


@pytest.mark.parametrize(
    "dtype, job, expected",
    [
        # float32: param read and written, grad read, 3 x (code + scale/256)
        # each way: about 18.1 bytes (docs/quantized-state.md).
        ("float32", "step", 12 + 6 * (1 + 4 / 256)),
        # The update is float32: 8-bit moments are read as float32.
        ("bfloat16", "update", 2 + 4 + 6 * (1 + 4 / 256)),
        ("bfloat16", "step", 6 + 6 * (1 + 4 / 256)),
    ],
)
def test_min_bytes_per_param_with_8_bit_state(dtype, job, expected):
    config = contenders.Config(dtype, "int8", nu_dtype="uint8")
    assert config.min_bytes_per_param(job) == pytest.approx(expected)
    assert config.optax_mu_dtype is None  # Peers keep mu in the param dtype.


def test_bench_with_8_bit_state_runs_every_contender(tmp_path, capsys):
    """--mu-dtype int8 --nu-dtype uint8: this package's step with 8-bit
    state beside optax's (full-precision state), and the table says so."""
    out = tmp_path / "run.json"
    args = ["bench", "--sizes", "8K", "--models", "", "--rounds", "1", "--no-torch"]
    options = ["--mu-dtype", "int8", "--nu-dtype", "uint8"]
    assert cli.main([*args, *options, "--json", str(out), "--png", ""]) == 0
    printed = capsys.readouterr().out
    assert (
        "(8-bit, this package; optax and torch keep mu in the param dtype)" in printed
    )
    run = json.loads(out.read_text())
    assert run["config"]["mu_dtype"] == "int8"
    names = {case["contender"] for case in run["cases"]}
    assert any(name.startswith("optax") for name in names)
    assert all(not case["note"].startswith("skipped") for case in run["cases"]), run[
        "cases"
    ]


@pytest.mark.slow
def test_bench_with_16_bit_nu_runs_every_contender(tmp_path, capsys):
    """--nu-dtype narrows this package's state and --stochastic-rounding
    rounds its 16-bit stores so; optax and torch, which have neither option,
    run as they are, and the table says so."""
    out = tmp_path / "run.json"
    args = ["bench", "--sizes", "4K", "--models", "", "--rounds", "1", "--no-torch"]
    options = ["--nu-dtype", "bfloat16", "--stochastic-rounding"]
    assert cli.main([*args, *options, "--json", str(out), "--png", ""]) == 0
    printed = capsys.readouterr().out
    assert "nu_dtype bfloat16 (this package; optax and torch keep" in printed
    assert "stochastic rounding (this package; optax and torch: to nearest)" in printed
    run = json.loads(out.read_text())
    assert run["config"]["nu_dtype"] == "bfloat16"
    assert run["config"]["stochastic_rounding"] is True
    assert run["config"]["bytes_per_param"]["step"] == 28
    assert all(case["median_s"] > 0 for case in run["cases"]), run["cases"]


def test_roofline_streams_the_steps_bytes_once():
    """One pass over a buffer of the step's minimum bytes: half read, half
    written, each word once."""
    config = contenders.Config("float32", "bfloat16", nu_dtype="bfloat16")
    run = contenders.roofline_pass({"w": (40, 25), "b": (200,)}, config)
    run()
    assert run.bytes_moved == 1200 * 24


def test_peaks_are_the_datasheets():
    assert peaks.peak_gb_per_s("NVIDIA H100 80GB HBM3") == 3350
    assert peaks.peak_gb_per_s("NVIDIA H200") == 4800
    assert math.isnan(peaks.peak_gb_per_s("cpu"))


@pytest.mark.parametrize(
    "device, expected",
    [
        (TPU, ["pallas", "xla"]),
        (H100, ["xla", "pallas"]),
        (A100, ["xla"]),
        (CPU, ["xla"]),
    ],
    ids=lambda v: getattr(v, "device_kind", None),
)
def test_bench_times_every_implementation_that_compiles_default_first(device, expected):
    assert contenders.implementations_here(device) == expected


def test_parse_size():
    assert workloads.parse_size("4M") == 4 << 20
    assert workloads.parse_size("64k") == 65536
    assert workloads.parse_size("1000") == 1000
    for bad in ("", "0", "-1", "4T", "1.5M"):
        with pytest.raises(ValueError, match="positive count"):
            workloads.parse_size(bad)


def test_model_workloads_have_their_published_sizes():
    sizes = {
        name: sum(math.prod(s) for s in shapes.values())
        for name, shapes in workloads.workloads([], workloads.MODELS).items()
    }
    assert sizes["gpt2-small"] == 124_439_808  # GPT-2 small, tied embedding.
    assert 50e6 < sizes["llama-small"] < 70e6
    assert sizes["transformer-tiny"] == 172_585  # verify's default tree.
    with pytest.raises(ValueError, match="unknown model 'gpt5'"):
        workloads.workloads([], ["gpt5"])


def _run(*fractions):
    cases = [
        {"workload": "flat-1M", "contender": name, "of_roofline": f}
        for name, f in zip(
            ["roofline", "step", "optax"], (1.0, *fractions), strict=True
        )
    ]
    return {"cases": cases}


def test_compare_flags_only_drops_beyond_tolerance():
    baseline = _run(0.8, 0.5)
    lines, regressed = report.compare(_run(0.7, 0.55), baseline, tolerance=0.25)
    assert not regressed, lines  # -12.5% and +10% are within 25%.
    lines, regressed = report.compare(_run(0.5, 0.55), baseline, tolerance=0.25)
    assert regressed
    assert [line.split()[0] for line in lines] == ["REGRESSION", "ok"]
    assert "step" in lines[0] and "-38%" in lines[0]


def test_compare_notes_a_baseline_from_another_machine():
    intel = {"cpu": "Intel(R) Xeon(R) Processor, 2 cores", "devices": "cpu"}
    amd = {"cpu": "AMD EPYC, 2 cores", "devices": "cpu"}
    baseline = _run(0.8, 0.5) | {"environment": intel}
    lines, regressed = report.compare(
        _run(0.8, 0.5) | {"environment": amd}, baseline, tolerance=0.1
    )
    assert not regressed
    assert lines[0].startswith("note: the baseline ran on cpu (Intel"), lines
    assert "this run on cpu (AMD EPYC" in lines[0]
    lines, _ = report.compare(
        _run(0.8, 0.5) | {"environment": intel}, baseline, tolerance=0.1
    )
    assert not any(line.startswith("note") for line in lines), lines


def test_compare_skips_cases_missing_or_not_measured():
    baseline = _run(0.8, float("nan"))
    lines, regressed = report.compare(_run(0.8, 0.1), baseline, tolerance=0.1)
    assert not regressed, lines
    partial = {"cases": _run(0.8, 0.5)["cases"][:2]}
    lines, regressed = report.compare(partial, baseline, tolerance=0.1)
    assert not regressed
    assert any(line.startswith("not run") and "optax" in line for line in lines)


@pytest.mark.slow
def test_bench_command_writes_table_json_png_and_compares(tmp_path, capsys):
    out = tmp_path / "run.json"
    png = tmp_path / "run.png"
    args = ["bench", "--sizes", "4K", "--models", "", "--rounds", "2", "--no-torch"]
    assert cli.main([*args, "--json", str(out), "--png", str(png)]) == 0
    printed = capsys.readouterr().out
    run = json.loads(out.read_text())
    assert png.read_bytes().startswith(b"\x89PNG")
    names = [c["contender"] for c in run["cases"]]
    assert names[0] == "roofline" and any(n.startswith("optax") for n in names)
    for case in run["cases"]:
        assert case["workload"] in printed and case["contender"] in printed
        assert case["median_s"] > 0 and case["rounds"] == 2, case
    assert run["cases"][0]["of_roofline"] == 1.0
    assert run["environment"]["jax"] and run["config"]["bytes_per_param"]["step"] == 36
    assert run["config"]["roofline"] == contenders.ROOFLINE_KIND
    assert run["config"]["device_kind"] == "cpu"
    assert math.isnan(run["config"]["peak_gb_per_s"])  # No table entry for CPUs.
    # Each of this package's and optax's jitted steps records its lowering
    # and compile; the roofline and torch, which are not timed so, do not.
    for case in run["cases"]:
        jitted = case["contender"].startswith(("step", "update", "optax"))
        for key in ("lower_s", "compile_s"):
            assert (case[key] > 0) if jitted else math.isnan(case[key]), case

    # Against a baseline in which our step ran at 100x the roofline: beyond
    # any timing noise and tolerance, so the command must fail.
    baseline = copy.deepcopy(run)
    for case in baseline["cases"]:
        if case["contender"].startswith("step"):
            case["of_roofline"] *= 100
    baseline_path = tmp_path / "baseline.json"
    baseline_path.write_text(json.dumps(baseline))
    compare = [*args, "--json", str(out), "--png", "", "--compare", str(baseline_path)]
    assert cli.main([*compare, "--tolerance", "0.4", "--retries", "1"]) == 1
    captured = capsys.readouterr()
    assert "REGRESSION" in captured.out
    # Each fallen case was measured again, and the run keeps both tries (a
    # case that fell by noise alone may be among them).
    assert "measuring again, as it fell: " in captured.err
    remeasured = [
        c for c in json.loads(out.read_text())["cases"] if "measurements" in c
    ]
    assert {c["contender"] for c in remeasured} >= {
        c["contender"] for c in baseline["cases"] if c["contender"].startswith("step")
    }
    assert all(len(c["measurements"]) == 2 for c in remeasured)


def test_a_fall_counts_only_if_every_measurement_shows_it():
    baseline = _run(0.8, 0.5)
    first = _run(0.4, 0.5)  # step fell by half; optax held.
    assert report.regressions(first, baseline, 0.25) == [("flat-1M", "step")]
    again = [{"workload": "flat-1M", "contender": "step", "of_roofline": 0.75}]
    kept = report.keep_best(first, again)
    step = next(c for c in kept["cases"] if c["contender"] == "step")
    assert step["of_roofline"] == 0.75 and step["measurements"] == [0.4, 0.75]
    assert report.regressions(kept, baseline, 0.25) == []
    # A second try that falls too keeps the better one, still fallen.
    kept = report.keep_best(first, [{**again[0], "of_roofline": 0.3}])
    assert report.regressions(kept, baseline, 0.25) == [("flat-1M", "step")]


def test_bench_command_rejects_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--sizes", "12X"])
    assert "size '12X'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["bench", "--tolerance", "1.5"])
    # A baseline of another dtype configuration is refused before measuring.
    other = tmp_path / "bf16.json"
    other.write_text(
        json.dumps({"config": {"dtype": "bfloat16", "mu_dtype": None}, "cases": []})
    )
    with pytest.raises(SystemExit):
        cli.main(["bench", "--compare", str(other)])
    assert "pass the same --dtype" in capsys.readouterr().err
    # So is a baseline of the roofline of the step's own shape, before
    # results recorded their roofline.
    old = tmp_path / "old.json"
    old.write_text(
        json.dumps({"config": {"dtype": "float32", "mu_dtype": None}, "cases": []})
    )
    with pytest.raises(SystemExit):
        cli.main(["bench", "--compare", str(old)])
    assert "measured a step-shaped roofline" in capsys.readouterr().err
    not_bench = tmp_path / "other.json"
    not_bench.write_text("{}")
    with pytest.raises(SystemExit):
        cli.main(["bench", "--compare", str(not_bench)])
    assert "is not a `pallas-amsgrad bench` JSON" in capsys.readouterr().err
