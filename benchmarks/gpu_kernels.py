"""The GPU kernels against each other and the XLA path, on a GPU host.

The pipelined Mosaic GPU kernel (`gpu.PIPELINED`, the default) and the
per-block one must agree bitwise; then each, and the XLA path, runs one
donated `step` on 256M float32 parameters in one leaf and on GPT-2 small's
148 leaves: median of `REPS` calls, GB/s at 36 bytes a parameter, and the
seconds of jax's lowering and XLA's compile. Then the ring's depth and the
grid's size are varied. One line per case on stdout.

    PYTHONPATH=. python3 benchmarks/gpu_kernels.py

`TINY=1` runs tiny sizes: a dry run on CPU, where "pallas" is Pallas'
interpreter and the timings mean nothing.
"""

import os
import statistics
import time

import jax
import jax.numpy as jnp

import pallas_amsgrad
from pallas_amsgrad.kernels import gpu
from pallas_amsgrad.tools import workloads

TINY = os.environ.get("TINY") == "1"
REPS = 3 if TINY else 9
DEFAULTS = {"PIPELINED": True, "MAX_STAGES": 4, "PERSISTENT_CTAS": None}


def arrays(shapes, seed):
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    return {
        name: 0.02 * jax.random.normal(k, s, jnp.float32)
        for k, (name, s) in zip(keys, shapes.items(), strict=True)
    }


def optimizer(implementation, **knobs):
    for k, v in {**DEFAULTS, **knobs}.items():
        setattr(gpu, k, v)  # Read when the step is traced.
    return pallas_amsgrad.amsgrad(1e-3, implementation=implementation)


def agree(name, shapes, **knobs):
    params, grads = arrays(shapes, 0), arrays(shapes, 1)
    out = {}
    for pipelined in (False, True):
        opt = optimizer("pallas", PIPELINED=pipelined, **knobs)
        step = jax.jit(opt.step)
        p, s = step(grads, opt.init(params), params)
        p, s = step(grads, s, p)
        out[pipelined] = jax.tree.leaves((p, s))
    same = all(
        bool(jnp.array_equal(a, b)) for a, b in zip(out[False], out[True], strict=True)
    )
    print(f"{name:12s} {knobs} pipelined == per-block bitwise: {same}", flush=True)


def timed(name, shapes, implementation, **knobs):
    params, grads = arrays(shapes, 0), arrays(shapes, 1)
    opt = optimizer(implementation, **knobs)
    state = jax.jit(opt.init)(params)

    def train_step(params, state, grads):
        return opt.step(grads, state, params)

    start = time.perf_counter()
    lowered = jax.jit(train_step, donate_argnums=(0, 1)).lower(params, state, grads)
    lowered_at = time.perf_counter()
    step = lowered.compile()
    compiled_at = time.perf_counter()
    params, state = step(params, state, grads)
    jax.block_until_ready((params, state))
    times = []
    for _ in range(REPS):
        t = time.perf_counter()
        params, state = step(params, state, grads)
        jax.block_until_ready((params, state))
        times.append(time.perf_counter() - t)
    median = statistics.median(times)
    n = sum(p.size for p in jax.tree.leaves(params))
    print(
        f"{name:12s} {implementation:6s} {knobs} {median * 1e3:8.3f} ms "
        f"{36 * n / median / 1e9:7.1f} GB/s  lower {lowered_at - start:5.2f} s "
        f"compile {compiled_at - lowered_at:5.2f} s",
        flush=True,
    )


flat = {"w": (4096,) if TINY else (256 * 2**20,)}
gpt2 = workloads.workloads([], ["gpt2-small"])["gpt2-small"]
if TINY:
    gpt2 = dict(list({k: (8, 128) for k in gpt2}.items())[:4])
agree("odd leaf", {"w": (1000 if TINY else 1_000_003,)})
agree("odd leaf", {"w": (1000 if TINY else 1_000_003,)}, MAX_STAGES=2)
for name, shapes in (("flat-256M", flat), ("gpt2-small", gpt2)):
    timed(name, shapes, "xla")
    for pipelined in (False, True):
        timed(name, shapes, "pallas", PIPELINED=pipelined)
for knobs in ({"MAX_STAGES": 2}, {"MAX_STAGES": 1, "PERSISTENT_CTAS": 3 * 132}):
    timed("flat-256M", flat, "pallas", **knobs)
