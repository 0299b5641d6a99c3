"""Timing the contenders of `pallas-amsgrad bench`, each call beside a
roofline call.

An AMSGrad step is memory traffic, so every contender is judged against the
roofline measured in the same run (see `contenders`). A contender's effective
bandwidth counts the minimum bytes of the job it does, so one that moves more
than the minimum (optax's separate apply pass) shows up as a lower fraction
of the roofline. Ratios to the same run's roofline are what `--compare`
tracks: they hold on a noisy shared machine where raw times do not.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import statistics
import sys
import time
from collections.abc import Callable

import jax

from pallas_amsgrad.tools.bench import peaks
from pallas_amsgrad.tools.bench.contenders import (
    ROOFLINE,
    Config,
    Contender,
    roofline_pass,
)
from pallas_amsgrad.tools.workloads import Shapes


@dataclasses.dataclass
class Case:
    workload: str
    parameters: int
    leaves: int
    contender: str
    job: str
    bytes_per_param: int
    median_s: float
    min_s: float
    rounds: int
    gb_per_s: float
    of_roofline: float  # Effective bandwidth over the same run's roofline.
    roofline_median_s: float  # The roofline calls alternated with this case's.
    of_peak: float = math.nan  # Effective bandwidth over the device's peak.
    lower_s: float = math.nan  # jit's trace and lowering, for jax contenders.
    compile_s: float = math.nan  # XLA's compile of the lowered step.
    note: str = ""


def _seconds(run: Callable[[], None]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def _time_beside(run, roofline, rounds: int) -> tuple[list[float], list[float]]:
    """(contender times, roofline times), one call of each per round.

    Alternating the two gives each contender's ratio to the roofline from
    calls a moment apart, so a machine that slows down mid-run slows both.
    """
    run()  # Compiles, and lets donation settle into its steady state.
    times, roofline_times = [], []
    for _ in range(rounds):
        roofline_times.append(_seconds(roofline))
        times.append(_seconds(run))
    return times, roofline_times


def measure(
    workloads_: dict[str, Shapes],
    contenders_: list[Contender],
    config: Config,
    rounds: int,
    progress=sys.stderr,
) -> list[Case]:
    """Every contender on every workload, each call beside a roofline call.

    A case's `of_roofline` is the median over rounds of (its effective
    bandwidth / the roofline's) from the pair of calls of that round. Each
    case is reported on `progress` as it finishes, with the elapsed time.
    """
    cases = []
    peak = peaks.peak_gb_per_s(jax.devices()[0].device_kind)
    start = time.perf_counter()
    total = len(workloads_) * len(contenders_)
    step_bytes = config.min_bytes_per_param("step")
    for w, (workload, shapes) in enumerate(workloads_.items()):
        parameters = sum(math.prod(s) for s in shapes.values())
        roofline = roofline_pass(shapes, config)
        roofline()  # Compiles.
        for c, contender in enumerate(contenders_):
            job = contender.job
            bytes_per_param = config.min_bytes_per_param(job)
            note, times, roofline_times, run = "", [], [], None
            try:
                if contender.name == ROOFLINE:  # The reference: 1 by definition.
                    times = [_seconds(roofline) for _ in range(rounds)]
                    roofline_times = times
                else:
                    run = contender.build(shapes, config)
                    times, roofline_times = _time_beside(run, roofline, rounds)
            except Exception as error:  # A peer that cannot run this case.
                note = f"skipped: {type(error).__name__}: {error}".splitlines()[0]
            lower_s = getattr(run, "lower_s", math.nan)
            compile_s = getattr(run, "compile_s", math.nan)
            run = None
            gc.collect()
            median = statistics.median(times) if times else math.nan
            gb_per_s = _gbps(bytes_per_param, parameters, median)
            ratios = [
                (bytes_per_param / t) / (step_bytes / r)
                for t, r in zip(times, roofline_times, strict=True)
            ]
            case = Case(
                workload=workload,
                parameters=parameters,
                leaves=len(shapes),
                contender=contender.name,
                job=job,
                bytes_per_param=bytes_per_param,
                median_s=median,
                min_s=min(times) if times else math.nan,
                rounds=len(times),
                gb_per_s=gb_per_s,
                of_roofline=statistics.median(ratios) if ratios else math.nan,
                roofline_median_s=(
                    statistics.median(roofline_times) if roofline_times else math.nan
                ),
                of_peak=gb_per_s / peak,
                lower_s=lower_s,
                compile_s=compile_s,
                note=note,
            )
            cases.append(case)
            if progress is not None:
                done = w * len(contenders_) + c + 1
                print(
                    f"[{done:>{len(str(total))}}/{total}] {workload:<12} "
                    f"{contender.name:<28} {format_ms(case.median_s)} "
                    f"{case.of_roofline:>6.0%} of roofline"
                    f"{'' if peak != peak else f', {case.of_peak:.0%} of peak'}; "
                    f"{time.perf_counter() - start:.0f} s elapsed {case.note}".rstrip(),
                    file=progress,
                    flush=True,
                )
        roofline = None
        gc.collect()
    return cases


def _gbps(bytes_per_param, parameters, seconds):
    if seconds is None or not seconds > 0:
        return math.nan
    return bytes_per_param * parameters / seconds / 1e9


def format_ms(seconds: float) -> str:
    return f"{seconds * 1e3:9.2f} ms" if seconds == seconds else f"{'-':>9}   "
