"""`pallas-amsgrad bench`: one AMSGrad step against optax, torch and the roofline.

An AMSGrad step is memory traffic, so every contender is judged against a
roofline measured in the same run: a streaming pass over the same leaves that
reads and writes exactly what a fused step must (param, grad, mu, nu, nu_max
in; param, mu, nu, nu_max out) with trivial arithmetic. A contender's
effective bandwidth counts the minimum bytes of the job it does, so a
contender that moves more than the minimum (optax's separate apply pass) shows
up as a lower fraction of the roofline. Ratios to the same run's roofline are
what `--compare` tracks: they hold on a noisy shared machine where raw times do
not.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import optax

import pallas_amsgrad
from pallas_amsgrad._environment import environment

Shapes = dict[str, tuple[int, ...]]
LEARNING_RATE = 1e-3


# --- Workloads: leaf shapes. ---------------------------------------------------


def flat(size: int) -> Shapes:
    return {"w": (size,)}


def gpt2_small() -> Shapes:
    """GPT-2 small's leaves (124M parameters, 148 leaves; tied embedding)."""
    d, vocab, context, layers = 768, 50257, 1024, 12
    shapes = {"wte": (vocab, d), "wpe": (context, d), "ln_f.g": (d,), "ln_f.b": (d,)}
    for i in range(layers):
        shapes |= {
            f"h{i}.ln_1.g": (d,),
            f"h{i}.ln_1.b": (d,),
            f"h{i}.attn.c_attn.w": (d, 3 * d),
            f"h{i}.attn.c_attn.b": (3 * d,),
            f"h{i}.attn.c_proj.w": (d, d),
            f"h{i}.attn.c_proj.b": (d,),
            f"h{i}.ln_2.g": (d,),
            f"h{i}.ln_2.b": (d,),
            f"h{i}.mlp.c_fc.w": (d, 4 * d),
            f"h{i}.mlp.c_fc.b": (4 * d,),
            f"h{i}.mlp.c_proj.w": (4 * d, d),
            f"h{i}.mlp.c_proj.b": (d,),
        }
    return shapes


def llama_small() -> Shapes:
    """A Llama-shaped model scaled to fit a CPU host: d_model 512, 8 layers,
    SwiGLU width 1408, vocab 32000, untied head (58.5M parameters, 75 leaves)."""
    d, ffn, vocab, layers = 512, 1408, 32000, 8
    shapes = {"embed": (vocab, d), "norm": (d,), "lm_head": (d, vocab)}
    for i in range(layers):
        shapes |= {
            f"layers{i}.attention_norm": (d,),
            f"layers{i}.wq": (d, d),
            f"layers{i}.wk": (d, d),
            f"layers{i}.wv": (d, d),
            f"layers{i}.wo": (d, d),
            f"layers{i}.ffn_norm": (d,),
            f"layers{i}.w1": (d, ffn),
            f"layers{i}.w3": (d, ffn),
            f"layers{i}.w2": (ffn, d),
        }
    return shapes


MODELS: dict[str, Callable[[], Shapes]] = {
    "gpt2-small": gpt2_small,
    "llama-small": llama_small,
}
DEFAULT_SIZES = "1M,4M,16M"
DEFAULT_MODELS = ",".join(MODELS)


def parse_size(text: str) -> int:
    """'4M' -> 4 * 2**20, '64K' -> 65536, '1000' -> 1000."""
    match = re.fullmatch(r"\s*(\d+)\s*([KkMmGg]?)\s*", text)
    if not match or int(match[1]) == 0:
        raise ValueError(f"size {text!r} is not a positive count like 4M, 64K or 1000")
    return int(match[1]) << {"": 0, "k": 10, "m": 20, "g": 30}[match[2].lower()]


def size_label(size: int) -> str:
    for shift, unit in ((30, "G"), (20, "M"), (10, "K")):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift}{unit}"
    return str(size)


def parse_workloads(sizes: str, models: str) -> dict[str, Shapes]:
    """`workloads` from comma-separated text ('' for none), e.g. "1M,64K"."""
    return workloads(
        [parse_size(s) for s in sizes.split(",") if s.strip()],
        [m.strip() for m in models.split(",") if m.strip()],
    )


def workloads(sizes: Iterable[int], models: Iterable[str]) -> dict[str, Shapes]:
    """{name: shapes}: flat leaves of each size, then the named model trees."""
    chosen = {f"flat-{size_label(s)}": flat(s) for s in sizes}
    for name in models:
        if name not in MODELS:
            raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
        chosen[name] = MODELS[name]()
    return chosen


# --- Bytes: the minimum traffic per parameter. ----------------------------------


def min_bytes_per_param(dtype, mu_dtype, job: str) -> int:
    """The least a `job` must read and write per parameter.

    step: read param, grad, mu, nu, nu_max; write param, mu, nu, nu_max.
    update: read grad, mu, nu, nu_max; write update, mu, nu, nu_max.
    update+apply: update, then read param and update and write param again.
    """
    p = jnp.dtype(dtype).itemsize
    m = jnp.dtype(mu_dtype or dtype).itemsize
    update_dtype = jnp.result_type(dtype, mu_dtype or dtype)
    u = jnp.dtype(update_dtype).itemsize
    moments = 2 * (m + 2 * p)  # mu, nu, nu_max read and written.
    if job == "step":
        return p + p + p + moments  # grad read, param read and written.
    if job == "update":
        return p + u + moments
    if job == "update+apply":
        return p + u + moments + p + u + p
    raise ValueError(f"unknown job {job!r}")


# --- Contenders: each builds a closure that runs one step and blocks. -----------


@dataclasses.dataclass(frozen=True)
class Config:
    dtype: str = "float32"
    mu_dtype: str | None = None


@dataclasses.dataclass(frozen=True)
class Contender:
    name: str
    job: str  # What one call does: "step" or "update" (see min_bytes_per_param).
    build: Callable[[Shapes, Config], Callable[[], None]]


def _random_tree(shapes: Shapes, dtype, seed: int, scale: float):
    keys = jax.random.split(jax.random.key(seed), len(shapes))

    @jax.jit
    def make(keys):
        return {
            name: (scale * jax.random.normal(k, shape, jnp.float32)).astype(dtype)
            for k, (name, shape) in zip(keys, shapes.items(), strict=True)
        }

    return make(keys)


def _inputs(shapes: Shapes, config: Config):
    params = _random_tree(shapes, config.dtype, 0, 0.02)
    grads = _random_tree(shapes, config.dtype, 1, 0.01)
    return params, grads


def _carry_step(fn, donate: bool, shapes, config, optimizer):
    """Runs `fn(grads, state, params) -> (params, state)`, feeding outputs back.

    Jitted as a training step, `(params, state, grads) -> (params, state)`:
    jax pairs donated inputs with same-typed outputs in order, so this order
    gives each donated buffer back to its own array. `jit(fn,
    donate_argnums=(1, 2))` would pair state.mu with the new params, and XLA
    would copy to honour it.
    """
    params, grads = _inputs(shapes, config)
    state = jax.jit(optimizer.init)(params)

    def train_step(params, state, grads):
        return fn(grads, state, params)

    jitted = jax.jit(train_step, donate_argnums=(0, 1) if donate else ())
    carry = [params, state]

    def run():
        carry[0], carry[1] = jitted(carry[0], carry[1], grads)
        jax.block_until_ready(carry)

    return run


def _ours(config):
    """This package's optimizer with its default implementation here."""
    return pallas_amsgrad.amsgrad(LEARNING_RATE, mu_dtype=config.mu_dtype)


def _our_step(donate: bool):
    def build(shapes, config):
        opt = _ours(config)
        return _carry_step(opt.step, donate, shapes, config, opt)

    return build


def _our_update(shapes, config):
    opt = _ours(config)

    def update_only(state, grads):
        updates, state = opt.update(grads, state)
        return state, updates

    params, grads = _inputs(shapes, config)
    state = jax.jit(opt.init)(params)
    jitted = jax.jit(update_only, donate_argnums=0)
    carry = [state]

    def run():
        carry[0], updates = jitted(carry[0], grads)
        jax.block_until_ready((updates, carry[0]))

    return run


def _optax_step(donate: bool):
    def build(shapes, config):
        opt = optax.amsgrad(LEARNING_RATE, mu_dtype=config.mu_dtype)

        def step(grads, state, params):
            updates, state = opt.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        return _carry_step(step, donate, shapes, config, opt)

    return build


def _roofline(shapes, config):
    """The same leaves and bytes as a fused step, with trivial arithmetic."""
    params, grads = _inputs(shapes, config)
    mu_dtype = config.mu_dtype or config.dtype
    moments = [
        jax.tree.map(lambda p, d=d: jnp.zeros_like(p, dtype=d), params)
        for d in (mu_dtype, config.dtype, config.dtype)
    ]

    def stream(params, moments, grads):
        def leaf(g, p, m, n, v):
            return p + g, m + g.astype(m.dtype), n + g, jnp.maximum(v, g)

        out = jax.tree.map(leaf, grads, params, *moments)
        new_params, *new_moments = (
            jax.tree.map(
                lambda o, i=i: o[i], out, is_leaf=lambda x: isinstance(x, tuple)
            )
            for i in range(4)
        )
        return new_params, new_moments

    jitted = jax.jit(stream, donate_argnums=(0, 1))
    carry = [params, moments]

    def run():
        carry[0], carry[1] = jitted(carry[0], carry[1], grads)
        jax.block_until_ready(carry)

    return run


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _torch_fused(shapes, config):
    import torch

    if config.mu_dtype not in (None, config.dtype):
        raise ValueError("torch keeps mu in the parameter dtype")
    dtype = getattr(torch, config.dtype)
    generator = torch.Generator().manual_seed(0)
    params = [
        torch.nn.Parameter(0.02 * torch.randn(s, generator=generator).to(dtype))
        for s in shapes.values()
    ]
    for p in params:
        p.grad = (0.01 * torch.randn(p.shape, generator=generator)).to(dtype)
    opt = torch.optim.Adam(params, lr=LEARNING_RATE, amsgrad=True, fused=True)
    return opt.step


ROOFLINE = "roofline"


def contenders(with_torch: bool) -> list[Contender]:
    """The roofline first, then this package, optax and (optionally) torch."""
    backend = jax.default_backend()
    ours = "pallas" if backend in ("tpu", "gpu") else "xla"
    chosen = [
        Contender(ROOFLINE, "step", _roofline),
        Contender(f"step [{ours}] donated", "step", _our_step(True)),
        Contender(f"step [{ours}]", "step", _our_step(False)),
        Contender(f"update [{ours}] donated", "update", _our_update),
        Contender("optax+apply donated", "step", _optax_step(True)),
        Contender("optax+apply", "step", _optax_step(False)),
    ]
    if with_torch and torch_available():
        import torch

        threads = torch.get_num_threads()
        chosen.append(
            Contender(f"torch fused ({threads} threads)", "step", _torch_fused)
        )
    return chosen


# --- Measuring. ---------------------------------------------------------------


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
    bandwidth / the roofline's) from the pair of calls of that round.
    """
    cases = []
    total = len(workloads_) * len(contenders_)
    step_bytes = min_bytes_per_param(config.dtype, config.mu_dtype, "step")
    for w, (workload, shapes) in enumerate(workloads_.items()):
        parameters = sum(math.prod(s) for s in shapes.values())
        roofline = _roofline(shapes, config)
        roofline()  # Compiles.
        for c, contender in enumerate(contenders_):
            job = contender.job
            bytes_per_param = min_bytes_per_param(config.dtype, config.mu_dtype, job)
            note, times, roofline_times = "", [], []
            try:
                if contender.name == ROOFLINE:  # The reference: 1 by definition.
                    times = [_seconds(roofline) for _ in range(rounds)]
                    roofline_times = times
                else:
                    run = contender.build(shapes, config)
                    times, roofline_times = _time_beside(run, roofline, rounds)
            except Exception as error:  # A peer that cannot run this case.
                note = f"skipped: {type(error).__name__}: {error}".splitlines()[0]
            run = None
            gc.collect()
            median = statistics.median(times) if times else math.nan
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
                gb_per_s=_gbps(bytes_per_param, parameters, median),
                of_roofline=statistics.median(ratios) if ratios else math.nan,
                roofline_median_s=(
                    statistics.median(roofline_times) if roofline_times else math.nan
                ),
                note=note,
            )
            cases.append(case)
            if progress is not None:
                done = w * len(contenders_) + c + 1
                print(
                    f"[{done:>{len(str(total))}}/{total}] {workload:<12} "
                    f"{contender.name:<28} {_ms(case.median_s)} "
                    f"{case.of_roofline:>6.0%} of roofline {case.note}".rstrip(),
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


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:9.2f} ms" if seconds == seconds else f"{'-':>9}   "


# --- Reports. -------------------------------------------------------------------


def report(cases: list[Case], config: Config, rounds: int) -> dict:
    return {
        "environment": environment(),
        "config": {
            "dtype": config.dtype,
            "mu_dtype": config.mu_dtype,
            "rounds": rounds,
            "learning_rate": LEARNING_RATE,
            "timing": "median of `rounds` calls after one warm-up call; each call "
            "alternates with a roofline call, and of_roofline is the median of "
            "the per-round ratios",
            "bytes_per_param": {
                job: min_bytes_per_param(config.dtype, config.mu_dtype, job)
                for job in ("step", "update", "update+apply")
            },
        },
        "cases": [dataclasses.asdict(c) for c in cases],
    }


def format_table(run: dict) -> str:
    env, config = run["environment"], run["config"]
    header = (
        f"{'workload':<12} {'params':>7} {'leaves':>6}  {'contender':<28} "
        f"{'median':>12} {'GB/s':>7} {'of roofline':>11}"
    )
    lines = [
        f"pallas-amsgrad bench on {env['backend']} ({env['devices']}; {env['cpu']}), "
        f"jax {env['jax']}, optax {env['optax']}, torch {env['torch']}",
        f"params {config['dtype']}, mu_dtype {config['mu_dtype'] or 'param'}; "
        f"minimum bytes/param: {config['bytes_per_param']}; "
        f"median of {config['rounds']} calls",
        header,
        "-" * len(header),
    ]
    for c in run["cases"]:
        lines.append(
            f"{c['workload']:<12} {_millions(c['parameters']):>7} {c['leaves']:>6}  "
            f"{c['contender']:<28} {_ms(c['median_s'])} {c['gb_per_s']:>7.2f} "
            f"{c['of_roofline']:>10.0%}  {c['note']}".rstrip()
        )
    return "\n".join(lines)


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
        f" - {env['backend']} ({env['devices']}; {env['cpu']})",
        fontsize=10,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
