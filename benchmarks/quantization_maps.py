"""Which 8-bit code maps should AMSGrad's block-quantized state use?

Measures candidate maps for `mu` (signed) and `nu`, `nu_max` (unsigned),
each with one scale per block of 256 consecutive elements along a leaf's last
dimension, on two small training tasks, three ways:

1. State error: the states of an exact float32 AMSGrad run (saved every
   `--snapshot-every` steps) are stored through each map and read back, and
   compared with the exact ones: mu's relative L2 error; nu's mean relative
   error over its nonzero elements, and the fraction of them stored as 0;
   nu_max rounded up, as the mean of sqrt(exact / stored) (the share of its
   step size an element keeps); and the relative L2 error of the direction
   mu / (sqrt(nu_max) + eps) read back from the stored mu and nu_max, in
   which an element counts by its step, not by its magnitude.
2. Training: the task trained with mu, nu and nu_max stored through a pair
   of maps after every step (mu and nu rounded to nearest, or
   stochastically; nu_max rounded up) and read back before the next; the
   final train and held-out losses against exact float32 AMSGrad's.
3. Cost on this CPU: storing and reading back a 384 x 384 array through
   bitsandbytes' table (a binary search per element) and through the spec's
   closed form.

The tasks, made here from a fixed seed, with a fresh batch every step:
* mlp: Gaussian inputs labelled by a random two-layer teacher (a tenth of
  the labels flipped), a 64-384-256-16 MLP student: full blocks, a row's
  tail (384 = 256 + 128) and short rows (16 classes).
* zipf: 512 classes drawn from softmax(teacher logits + log p), p Zipfian
  (p_k ~ 1 / k^1.1, classes in frequency order as in a sorted vocabulary);
  a 64-256-512 student. Its output layer's rows hold frequent and rare
  classes in one block: moments spread over decades, as an LM's head.
Leaves the spec's `quantizes` rule leaves out (the biases) stay float32.

The small floats with power-of-two scales run through `spec/quantization.py`
itself; the other maps through a brute-force quantizer over their 256-entry
table (tests/test_spec_quantization.py checks the spec against one). Plain
jax and the spec, no package code:

    python benchmarks/quantization_maps.py --out benchmarks/results/quantization-maps-cpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import pathlib
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import amsgrad_spec as spec

BLOCK = spec.QUANTIZATION_BLOCK
EPS = 1e-8


# --- The candidate maps. ------------------------------------------------------


def linear(signed: bool) -> np.ndarray:
    """k / 127 for k in [-127, 127], or k / 255 for k in [0, 255]."""
    return np.arange(-127, 128) / 127 if signed else np.arange(256) / 255


def linear_without_zero() -> np.ndarray:
    """(k + 1) / 256: Li et al.'s (2309.01507) linear map for nu, without a
    zero (no zero-point problem; but no exact zero either)."""
    return (np.arange(256) + 1) / 256


def square_root_linear() -> np.ndarray:
    """(k / 255)^2: linear in sqrt(nu), the gradient's scale."""
    return (np.arange(256) / 255) ** 2


def dynamic_tree(signed: bool) -> np.ndarray:
    """Dettmers et al.'s (2110.02861) dynamic map, as bitsandbytes'
    `create_dynamic_map(signed)`: for i = 0..6 the midpoints of a linear grid
    over [0.1, 1] of 2^i (signed) or 2^(i+1) (unsigned) intervals, times
    10^(i - 6); with 0 and 1, and their negatives when signed."""
    values = [0.0, 1.0]
    for i in range(7):
        intervals = 2**i if signed else 2 ** (i + 1)
        edges = np.linspace(0.1, 1, intervals + 1)
        means = 10.0 ** (i - 6) * (edges[:-1] + edges[1:]) / 2
        values += list(means) + ([-m for m in means] if signed else [])
    return np.unique(np.float32(values)).astype(np.float64)


@dataclasses.dataclass(frozen=True, eq=False)
class Candidate:
    """A map and its scale: a table with the block's max |x| as scale (its
    largest value 1.0), or a `spec.CodeMap` with the spec's power-of-two
    scale."""

    name: str
    table: np.ndarray | None = None
    code_map: spec.CodeMap | None = None

    def stored(self, x, rounding: str, bits=None):
        """x stored through the map and read back."""
        if self.code_map is not None:
            codes, scales = spec.quantize(x, self.code_map, rounding, bits)
            return spec.dequantize(codes, scales, self.code_map)
        return table_stored(x, self.table, rounding, bits)


def small_float(exponent_bits: int, mantissa_bits: int, signed: bool) -> Candidate:
    code_map = spec.CodeMap(exponent_bits, mantissa_bits, signed)
    return Candidate(f"E{exponent_bits}M{mantissa_bits}", code_map=code_map)


def small_float_to_one(exponent_bits, mantissa_bits, signed) -> Candidate:
    """The small float's values up to 1.0 (its top binade but 1.0 dropped),
    with an absmax scale: what a power-of-two scale is measured against."""
    values = np.asarray(
        spec.code_values(spec.CodeMap(exponent_bits, mantissa_bits, signed))
    )
    return Candidate(
        f"E{exponent_bits}M{mantissa_bits} absmax",
        table=values[np.abs(values) <= 1].astype(np.float64),
    )


MU_CANDIDATES = [
    Candidate("linear", table=linear(True)),
    Candidate("dynamic (bnb)", table=dynamic_tree(True)),
    small_float(0, 7, True),  # Linear, with a power-of-two scale.
    small_float(2, 5, True),
    small_float(3, 4, True),
    small_float(4, 3, True),
    small_float(5, 2, True),
    small_float_to_one(2, 5, True),
]
NU_CANDIDATES = [
    Candidate("linear", table=linear(False)),
    Candidate("linear without 0", table=linear_without_zero()),
    Candidate("sqrt-linear", table=square_root_linear()),
    Candidate("dynamic (bnb)", table=dynamic_tree(False)),
    small_float(0, 8, False),
    small_float(2, 6, False),
    small_float(3, 5, False),
    small_float(4, 4, False),
    small_float(5, 3, False),
    small_float_to_one(4, 4, False),
]
MU_BY_NAME = {c.name: c for c in MU_CANDIDATES}
NU_BY_NAME = {c.name: c for c in NU_CANDIDATES}
# (mu map, nu map, stochastic) trained with; the spec's choice is E3M4 / E4M4.
TRAINED = [
    ("linear", "linear", False),
    ("dynamic (bnb)", "dynamic (bnb)", False),
    ("E2M5", "E4M4", False),
    ("E3M4", "E4M4", False),
    ("E3M4", "E4M4", True),
]


def table_stored(x, table, rounding: str, bits=None):
    """x stored through a sorted `table` with absmax scales, by brute force,
    and read back: nearest (ties to the lower code), up (the smallest code
    whose value times the scale is >= x) or stochastic (by `bits`)."""
    n = x.shape[-1]
    pad = -n % BLOCK
    xb = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
    xb = xb.reshape(*xb.shape[:-1], -1, BLOCK)
    scale = jnp.max(jnp.abs(xb), axis=-1, keepdims=True)
    values = jnp.asarray(table, jnp.float32)
    last = len(table) - 1
    q = jnp.where(scale > 0, xb / jnp.where(scale > 0, scale, 1.0), 0.0)
    q = jnp.clip(q, values[0], values[-1])
    upper = jnp.clip(jnp.searchsorted(values, q, side="left"), 1, last)
    lo, hi = values[upper - 1], values[upper]
    if rounding == "nearest":
        code = jnp.where((hi - q < q - lo) | (q == hi), upper, upper - 1)
    elif rounding == "stochastic":
        bits = jnp.pad(bits, [(0, 0)] * (x.ndim - 1) + [(0, pad)]).reshape(xb.shape)
        uniform = (bits >> 8).astype(jnp.float32) * 2.0**-24
        code = jnp.where(uniform < (q - lo) / (hi - lo), upper, upper - 1)
    else:  # The table's code at or above q, then checked on the value read back.
        code = jnp.where(q <= lo, upper - 1, upper)
        below = jnp.maximum(code - 1, 0)
        code = jnp.where((code > 0) & (values[below] * scale >= xb), below, code)
        code = jnp.where((values[code] * scale < xb) & (code < last), code + 1, code)
    return (values[code] * scale).reshape(*x.shape[:-1], -1)[..., :n]


# --- The tasks. -----------------------------------------------------------------


def mlp_params(key, widths):
    keys = jax.random.split(key, len(widths) - 1)
    params = {}
    for i, (k, (fan_in, fan_out)) in enumerate(
        zip(keys, itertools.pairwise(widths), strict=True)
    ):
        w = jax.random.normal(k, (fan_in, fan_out)) * np.sqrt(2 / fan_in)
        params[f"layer{i}"] = {"w": w, "b": jnp.zeros(fan_out)}
    return params


def mlp_loss(params, x, labels):
    h = x
    for i in range(len(params)):
        h = h @ params[f"layer{i}"]["w"] + params[f"layer{i}"]["b"]
        if i < len(params) - 1:
            h = jax.nn.relu(h)
    logp = jax.nn.log_softmax(h)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))


@dataclasses.dataclass(frozen=True)
class Task:
    """Inputs, a labelling teacher and the student's layer widths."""

    name: str
    features: int
    classes: int
    widths: tuple[int, ...]
    zipf: float | None = None  # Class prior p_k ~ 1 / k^zipf, or labels by argmax.
    label_noise: float = 0.1

    def teacher(self, seed: int):
        rng = np.random.default_rng(seed)
        hidden = 128
        w1 = rng.normal(0, 1 / np.sqrt(self.features), (self.features, hidden))
        w2 = rng.normal(0, 1 / np.sqrt(hidden), (hidden, self.classes))
        return w1, w2

    def sample(self, teacher, rng, n: int):
        w1, w2 = teacher
        x = rng.normal(size=(n, self.features)).astype(np.float32)
        logits = np.tanh(x @ w1) @ w2
        if self.zipf is None:
            labels = np.argmax(logits, axis=1)
            flipped = rng.random(n) < self.label_noise
            labels[flipped] = rng.integers(0, self.classes, flipped.sum())
        else:
            prior = -self.zipf * np.log(np.arange(1, self.classes + 1))
            gumbel = -np.log(-np.log(rng.random((n, self.classes))))
            labels = np.argmax(3 * logits + prior + gumbel, axis=1)
        return jnp.asarray(x), jnp.asarray(labels)


TASKS = [
    Task("mlp", features=64, classes=16, widths=(64, 384, 256, 16)),
    Task("zipf", features=64, classes=512, widths=(64, 256, 512), zipf=1.1),
]


# --- Storing the state through a pair of maps. ----------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Storage:
    """How a run stores mu, nu and nu_max: exactly (no maps), or through a
    pair of maps, mu and nu rounded to nearest or stochastically."""

    name: str
    mu: Candidate | None = None
    nu: Candidate | None = None
    stochastic: bool = False

    def store(self, state, seed):
        if self.mu is None:
            return state
        fields = {}
        for field, candidate, array in (
            ("mu", self.mu, spec.MU),
            ("nu", self.nu, spec.NU),
            ("nu_max", self.nu, spec.NU_MAX),
        ):
            leaves = jax.tree.leaves_with_path(getattr(state, field))
            stored = [
                self.store_leaf(x, candidate, array, state.count, seed, path)
                for path, x in leaves
            ]
            fields[field] = jax.tree.structure(state.mu).unflatten(stored)
        return state._replace(**fields)

    def store_leaf(self, x, candidate, array, count, seed, path):
        if not spec.quantizes(x.shape):
            return x
        if array == spec.NU_MAX:
            return candidate.stored(x, "up")
        if not self.stochastic:
            return candidate.stored(x, "nearest")
        leaf = spec.leaf_id(jax.tree_util.keystr(path))
        bits = spec.random_bits(spec.stream_key(seed, count, leaf, array), x.shape)
        return candidate.stored(x, "stochastic", bits)


def train(task: Task, storage: Storage, args, snapshots=None):
    """Train; the final train (window mean) and held-out losses. With
    `snapshots` (a list), appends the exact state every `snapshot_every`."""
    schedule = optax.cosine_decay_schedule(args.learning_rate, args.steps, alpha=0.01)
    hp = spec.Hyperparams(learning_rate=schedule)
    params = mlp_params(jax.random.key(args.seed), task.widths)
    state = spec.init(params)

    @jax.jit
    def step(params, state, x, labels):
        value, grads = jax.value_and_grad(mlp_loss)(params, x, labels)
        updates, exact = spec.update(grads, state, hp)
        return (
            spec.apply(params, updates),
            storage.store(exact, args.seed),
            exact,
            value,
        )

    teacher = task.teacher(args.seed)
    held = task.sample(teacher, np.random.default_rng(args.seed + 1), args.held_out)
    rng = np.random.default_rng(args.seed + 2)
    values, start = [], time.perf_counter()
    for i in range(args.steps):
        batch = task.sample(teacher, rng, args.batch)
        params, state, exact, value = step(params, state, *batch)
        values.append(value)
        if snapshots is not None and (i + 1) % args.snapshot_every == 0:
            snapshots.append(exact)
    return {
        "train": float(np.mean(jax.device_get(values[-args.window :]))),
        "held_out": float(jax.jit(mlp_loss)(params, *held)),
        "seconds": time.perf_counter() - start,
    }


# --- State errors on the exact run's states. -------------------------------------


def state_errors(snapshots, mu: Candidate | None, nu: Candidate | None):
    """The means over snapshots and quantized leaves of the error metrics."""
    metrics = {}

    def add(name, value):
        metrics.setdefault(name, []).append(float(value))

    def relative_l2(stored, exact):
        return jnp.linalg.norm(stored - exact) / jnp.linalg.norm(exact)

    for state in snapshots:
        leaves = (jax.tree.leaves(t) for t in (state.mu, state.nu, state.nu_max))
        for m, v, v_max in zip(*leaves, strict=True):
            if not spec.quantizes(m.shape):
                continue
            m_read, v_max_read = m, v_max
            if mu is not None:
                m_read = mu.stored(m, "nearest")
                add("mu_rel_l2", relative_l2(m_read, m))
            if nu is not None:
                nonzero = v > 0
                v_read = nu.stored(v, "nearest")
                error = jnp.abs(v_read - v) / jnp.where(nonzero, v, 1)
                add("nu_mean_rel", jnp.where(nonzero, error, 0).sum() / nonzero.sum())
                add("nu_zeroed", ((v_read == 0) & nonzero).sum() / nonzero.sum())
                v_max_read = nu.stored(v_max, "up")
                if not bool(jnp.all(v_max_read >= v_max)):
                    raise AssertionError(f"{nu.name} rounded nu_max down")
                kept = jnp.sqrt(v_max / jnp.where(v_max_read > 0, v_max_read, 1))
                add("step_kept", jnp.where(v_max > 0, kept, 1).mean())
            add(
                "direction_rel_l2",
                relative_l2(
                    m_read / (jnp.sqrt(v_max_read) + EPS), m / (jnp.sqrt(v_max) + EPS)
                ),
            )
    return {name: float(np.mean(values)) for name, values in metrics.items()}


def store_seconds(candidate: Candidate, rounding: str, repeats: int = 20) -> float:
    x = jnp.asarray(np.random.default_rng(0).random((384, 384), np.float32))
    stored = jax.jit(lambda x: candidate.stored(x, rounding))
    stored(x).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        stored(x).block_until_ready()
    return (time.perf_counter() - start) / repeats


def environment() -> dict:
    return {
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "jax": jax.__version__,
        "python": platform.python_version(),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--held-out", type=int, default=4096)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--window", type=int, default=50)
    parser.add_argument("--snapshot-every", type=int, default=75)
    parser.add_argument(
        "--out", default="benchmarks/results/quantization-maps-cpu.json"
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    results = {"environment": environment(), "arguments": vars(args), "tasks": {}}
    for task in TASKS:
        print(f"== {task.name}: widths {task.widths}", flush=True)
        snapshots = []
        reference = train(task, Storage("float32"), args, snapshots)
        print(
            f"float32: train {reference['train']:.4f}, "
            f"held-out {reference['held_out']:.4f}",
            flush=True,
        )
        errors = {}
        for candidate in MU_CANDIDATES:
            errors[f"mu {candidate.name}"] = state_errors(snapshots, candidate, None)
        for candidate in NU_CANDIDATES:
            errors[f"nu {candidate.name}"] = state_errors(snapshots, None, candidate)
        for mu, nu, _ in TRAINED[:4]:
            errors[f"mu {mu} + nu {nu}"] = state_errors(
                snapshots, MU_BY_NAME[mu], NU_BY_NAME[nu]
            )
        for name, metrics in errors.items():
            print(
                f"  {name:26s} "
                + "  ".join(f"{k} {v:.3g}" for k, v in metrics.items()),
                flush=True,
            )
        runs = {}
        for mu, nu, stochastic in TRAINED:
            name = f"{mu} / {nu}" + (", stochastic" if stochastic else "")
            storage = Storage(name, MU_BY_NAME[mu], NU_BY_NAME[nu], stochastic)
            run = train(task, storage, args)
            run["train_gap"] = run["train"] - reference["train"]
            run["held_out_gap"] = run["held_out"] - reference["held_out"]
            runs[name] = run
            print(
                f"  {name:26s} train {run['train']:.4f} ({run['train_gap']:+.4f})"
                f"  held-out {run['held_out']:.4f} ({run['held_out_gap']:+.4f})",
                flush=True,
            )
        results["tasks"][task.name] = {
            "task": dataclasses.asdict(task),
            "reference": reference,
            "state_errors": errors,
            "runs": runs,
        }
    results["store_seconds_384x384"] = {
        f"{candidate.name} {rounding}": store_seconds(candidate, rounding)
        for candidate in (NU_BY_NAME["dynamic (bnb)"], NU_BY_NAME["E4M4"])
        for rounding in ("nearest", "up")
    }
    for name, seconds in results["store_seconds_384x384"].items():
        print(f"store and read back 384 x 384, {name}: {seconds * 1e3:.2f} ms")
    results["seconds"] = time.perf_counter() - start
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out} in {results['seconds']:.0f} s")


if __name__ == "__main__":
    main()
