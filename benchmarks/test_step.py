"""pytest-benchmark suite: the cases of `pallas-amsgrad bench`, one test each.

    pytest benchmarks --benchmark-only
    pytest benchmarks --benchmark-only --benchmark-autosave   # then --benchmark-compare

Each test times one call of a contender (a whole optimizer step that blocks
until its outputs are ready). The roofline case (a streaming pass with the
step's bytes) runs beside them; `pallas-amsgrad bench` turns the same cases
into fractions of that roofline and tracks regressions with --compare.
Set PALLAS_AMSGRAD_BENCH_SIZES (e.g. "1M,64M") and
PALLAS_AMSGRAD_BENCH_MODELS (e.g. "gpt2-small") to choose the workloads.
"""

from __future__ import annotations

import math
import os

import pytest

from pallas_amsgrad.tools import workloads
from pallas_amsgrad.tools.bench import contenders

WORKLOADS = workloads.parse_workloads(
    os.environ.get("PALLAS_AMSGRAD_BENCH_SIZES", workloads.BENCH_SIZES),
    os.environ.get("PALLAS_AMSGRAD_BENCH_MODELS", workloads.BENCH_MODELS),
)
CONTENDERS = {c.name: c for c in contenders.contenders(with_torch=True)}
CONFIG = contenders.Config()


@pytest.mark.parametrize("contender", list(CONTENDERS))
@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_step(benchmark, workload, contender):
    shapes = WORKLOADS[workload]
    chosen = CONTENDERS[contender]
    run = chosen.build(shapes, CONFIG)
    parameters = sum(math.prod(s) for s in shapes.values())
    bytes_per_param = contenders.min_bytes_per_param(
        CONFIG.dtype, CONFIG.mu_dtype, chosen.job
    )
    benchmark.extra_info.update(
        parameters=parameters,
        leaves=len(shapes),
        bytes_per_param=bytes_per_param,
    )
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    benchmark.extra_info["gb_per_s"] = (
        bytes_per_param * parameters / benchmark.stats.stats.median / 1e9
    )
