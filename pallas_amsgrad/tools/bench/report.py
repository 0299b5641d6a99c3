"""Reports of `pallas-amsgrad bench`: JSON, the table, the plot, and the
comparison with a baseline run."""

from __future__ import annotations

import dataclasses
import math

import jax

from pallas_amsgrad.tools.bench import peaks
from pallas_amsgrad.tools.bench.contenders import (
    LEARNING_RATE,
    ROOFLINE,
    ROOFLINE_KIND,
    Config,
)
from pallas_amsgrad.tools.bench.measure import Case, format_ms
from pallas_amsgrad.tools.environment import describe_revision, environment


def report(cases: list[Case], config: Config, rounds: int) -> dict:
    device_kind = jax.devices()[0].device_kind
    return {
        "environment": environment(),
        "config": {
            "device_kind": device_kind,
            "peak_gb_per_s": peaks.peak_gb_per_s(device_kind),
            "roofline": ROOFLINE_KIND,
            "dtype": config.dtype,
            "mu_dtype": config.mu_dtype,
            "nu_dtype": config.nu_dtype,
            "stochastic_rounding": config.stochastic_rounding,
            "recipe": config.recipe,
            "rounds": rounds,
            "learning_rate": LEARNING_RATE,
            "timing": "median of `rounds` calls after one warm-up call; each call "
            "alternates with a roofline call, and of_roofline is the median of "
            "the per-round ratios; of_peak is the median's bandwidth over the "
            "device's peak (nan where the table has no peak for it); lower_s "
            "and compile_s time a jitted contender's jax lowering and XLA "
            "compile",
            "bytes_per_param": {
                job: config.min_bytes_per_param(job)
                for job in ("step", "update", "update+apply")
            },
        },
        "cases": [dataclasses.asdict(c) for c in cases],
    }


def _nu_dtype(config: dict) -> str:
    """ ", nu_dtype bfloat16 (this package; optax and torch: param)", and
    the stochastic rounding, or ""."""
    text = ""
    if config.get("mu_dtype") == "int8":
        text += " (8-bit, this package; optax and torch keep mu in the param dtype)"
    if config.get("nu_dtype"):
        text += (
            f", nu_dtype {config['nu_dtype']} (this package; optax and torch keep "
            "nu in the param dtype)"
        )
    if config.get("stochastic_rounding"):
        text += ", stochastic rounding (this package; optax and torch: to nearest)"
    return text


def format_table(run: dict) -> str:
    env, config = run["environment"], run["config"]
    header = (
        f"{'workload':<12} {'params':>7} {'leaves':>6}  {'contender':<28} "
        f"{'median':>12} {'GB/s':>7} {'of roofline':>11} {'of peak':>7} "
        f"{'compile':>8}"
    )
    lines = [
        f"pallas-amsgrad bench on {env['backend']} ({env['devices']}; {env['cpu']}), "
        f"jax {env['jax']}, optax {env['optax']}, torch {env['torch']}, "
        f"{describe_revision(env)}",
        f"params {config['dtype']}, mu_dtype {config['mu_dtype'] or 'param'}"
        f"{_nu_dtype(config)}"
        f"{', recipe (clip, decay, skips)' if config.get('recipe') else ''}; "
        f"minimum bytes/param: {config['bytes_per_param']}; "
        f"median of {config['rounds']} calls",
        header,
        "-" * len(header),
    ]
    for c in run["cases"]:
        lines.append(
            f"{c['workload']:<12} {_millions(c['parameters']):>7} {c['leaves']:>6}  "
            f"{c['contender']:<28} {format_ms(c['median_s'])} {c['gb_per_s']:>7.2f} "
            f"{c['of_roofline']:>10.0%} {_percent(c.get('of_peak', math.nan)):>7} "
            f"{_seconds(c.get('lower_s', math.nan), c.get('compile_s', math.nan))} "
            f" {c['note']}".rstrip()
        )
    return "\n".join(lines)


def _percent(fraction: float) -> str:
    return f"{fraction:.0%}" if fraction == fraction else "-"


def _seconds(lower_s: float, compile_s: float) -> str:
    """Lowering plus compile, or "-" for a contender jax does not compile."""
    total = lower_s + compile_s
    return f"{total:7.2f}s" if total == total else f"{'-':>8}"


def _millions(n: int) -> str:
    return f"{n / 1e6:.1f}M"


def compare(run: dict, baseline: dict, tolerance: float) -> tuple[list[str], bool]:
    """Lines describing each case against the baseline, and whether any regressed.

    A case regresses when its fraction of the roofline falls below the
    baseline's by more than `tolerance` (relative): a ratio to a roofline
    measured in the same run, so a busier or slower machine moves both.
    """
    before = {(c["workload"], c["contender"]): c for c in baseline["cases"]}
    lines, regressed = [], False
    machine = _machine(run.get("environment", {}))
    if machine != _machine(baseline.get("environment", {})):
        lines.append(
            f"note: the baseline ran on {_machine(baseline.get('environment', {}))}, "
            f"this run on {machine}; fractions of the roofline move between "
            "machines, so compare against a baseline made on this one"
        )
    for case in run["cases"]:
        key = (case["workload"], case["contender"])
        if case["contender"] == ROOFLINE or key not in before:
            continue
        old, new = before[key]["of_roofline"], case["of_roofline"]
        if not (old == old and new == new):  # A skipped case on either side.
            continue
        change = new / old - 1
        slower = change < -tolerance
        regressed |= slower
        lines.append(
            f"{'REGRESSION' if slower else 'ok':<10} {key[0]:<12} {key[1]:<28} "
            f"{old:6.0%} -> {new:6.0%} of roofline ({change:+.0%})"
        )
    missing = sorted(
        set(before) - {(c["workload"], c["contender"]) for c in run["cases"]}
    )
    not_run: dict[str, list[str]] = {}
    for workload, contender in missing:
        if contender != ROOFLINE:
            not_run.setdefault(workload, []).append(contender)
    for workload, names in not_run.items():  # One line per workload.
        lines.append(f"{'not run':<10} {workload:<12} {', '.join(names)}")
    return lines, regressed


def regressions(run: dict, baseline: dict, tolerance: float) -> list[tuple[str, str]]:
    """(workload, contender) of each case that fell beyond `tolerance`."""
    before = {
        (c["workload"], c["contender"]): c["of_roofline"] for c in baseline["cases"]
    }
    return [
        (c["workload"], c["contender"])
        for c in run["cases"]
        if c["contender"] != ROOFLINE
        and (c["workload"], c["contender"]) in before
        and c["of_roofline"] / before[(c["workload"], c["contender"])] - 1 < -tolerance
    ]


def keep_best(run: dict, again: list[dict]) -> dict:
    """`run` with each case measured `again` replaced by whichever of its
    measurements came nearest the roofline, and noted."""
    remeasured = {(c["workload"], c["contender"]): c for c in again}
    cases = []
    for case in run["cases"]:
        new = remeasured.get((case["workload"], case["contender"]))
        if new is not None and case["contender"] != ROOFLINE:
            tries = case.get("measurements", [case["of_roofline"]])
            tries = [*tries, new["of_roofline"]]
            best = new if new["of_roofline"] > case["of_roofline"] else case
            case = {**best, "measurements": tries, "note": "best of its measurements"}
        cases.append(case)
    return {**run, "cases": cases}


def _machine(environment: dict) -> str:
    return f"{environment.get('devices', '?')} ({environment.get('cpu', '?')})"


def plot(run: dict, path: str) -> None:
    """Step time and fraction of roofline against parameter count."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, (times, fractions) = plt.subplots(1, 2, figsize=(12, 4.5))
    by_contender: dict[str, list[dict]] = {}
    for c in run["cases"]:
        if c["median_s"] == c["median_s"]:
            by_contender.setdefault(c["contender"], []).append(c)
    for name, cases in by_contender.items():
        cases.sort(key=lambda c: c["parameters"])
        x = [c["parameters"] for c in cases]
        style = "k--" if name == ROOFLINE else "o-"
        times.plot(x, [c["median_s"] * 1e3 for c in cases], style, label=name)
        fractions.plot(x, [c["of_roofline"] for c in cases], style, label=name)
    env, config = run["environment"], run["config"]
    for axes, label in ((times, "step time (ms)"), (fractions, "fraction of roofline")):
        axes.set_xscale("log")
        axes.set_xlabel("parameters")
        axes.set_ylabel(label)
        axes.grid(True, which="both", alpha=0.3)
    times.set_yscale("log")
    fractions.legend(fontsize=8)
    figure.suptitle(
        f"AMSGrad step, {config['dtype']} params, mu {config['mu_dtype'] or 'param'}"
        f"{_nu_dtype(config)}"
        f" - {env['backend']} ({env['devices']}; {env['cpu']})",
        fontsize=10,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
