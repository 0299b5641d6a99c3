"""`pallas-amsgrad verify`: kernel, XLA path, spec and optax, side by side.

Every configuration of param dtype x mu_dtype runs N steps (one with a zero
gradient) on a model-shaped pytree. Each step starts every contender from the
same state and is compared with the spec, in ULPs of the output dtype counted
at the magnitude of the summands (so cancellation in mu = (1-b1) g + b1 mu does
not inflate a last-bit difference).
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax

import amsgrad_spec as spec
from pallas_amsgrad import _transform
from pallas_amsgrad._environment import environment

PARAM_DTYPES = ("float32", "bfloat16", "float16")
MU_DTYPES = (None, "bfloat16", "float16", "float32")

# Largest error, in ULPs, that passes. tests/tolerances.py derives 4 (float32)
# and 1 (16-bit outputs) for IEEE arithmetic; here the backend runs as
# deployed, and XLA:CPU and GPUs contract a*b + c into FMAs wherever a fusion
# allows, each saving a rounding the spec makes: float32 gets 8.
IMPLEMENTATION_ULPS = {"float32": 8, "float64": 8, "bfloat16": 1, "float16": 1}
# optax rounds intermediates to the narrowest dtype of the configuration (e.g.
# b1 * mu in a bfloat16 mu), so its error is counted in that dtype's ULPs.
OPTAX_ULPS = {"float32": 8, "float64": 8, "bfloat16": 6, "float16": 6}


def default_params(seed: int = 0) -> dict[str, np.ndarray]:
    """Leaf shapes of a two-layer transformer (d_model 64, vocab 1000)."""
    shapes = {
        "embed": (1000, 64),
        "position": (128, 64),
        "final_norm.scale": (64,),
        "head.bias": (1000,),
        "temperature": (),
    }
    for layer in range(2):
        shapes |= {
            f"layer{layer}.norm.scale": (64,),
            f"layer{layer}.attention.qkv": (64, 192),
            f"layer{layer}.attention.qkv_bias": (192,),
            f"layer{layer}.attention.out": (64, 64),
            f"layer{layer}.mlp.up": (64, 256),
            f"layer{layer}.mlp.up_bias": (256,),
            f"layer{layer}.mlp.down": (256, 64),
        }
    rng = np.random.default_rng(seed)
    return {
        name: rng.normal(0, 0.05, shape).astype(np.float32)
        for name, shape in shapes.items()
    }


def load_params(path: str) -> dict[str, np.ndarray]:
    """A user's parameters from an .npz file: one floating array per leaf."""
    with np.load(path, allow_pickle=False) as archive:
        params = {name: archive[name] for name in archive.files}
    if not params:
        raise ValueError(f"{path}: no arrays in the file")
    for name, array in params.items():
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(
                f"{path}: leaf {name!r} has dtype {array.dtype}; parameters must "
                "be floating point"
            )
    return params


@dataclasses.dataclass
class Row:
    """One contender on one configuration, compared with the spec."""

    params: str
    mu_dtype: str
    contender: str
    max_ulps: float
    ulp_dtype: str  # The dtype whose ULPs `max_ulps` counts.
    bound: int
    passed: bool
    left_out: int = 0  # optax values out of float16's range, not compared.
    note: str = ""


def _out_of_float16_range(magnitude_state, float16_params, float16_mu):
    """Masks of outputs where optax, and not the spec, leaves float16's range.

    With float16 params optax's (1-b2) g**2 goes subnormal (and its eps=1e-8
    is 0, so a zero gradient gives 0/0); with a float16 mu, its b1 * mu does.
    Either loses the relative precision the spec keeps. Masks are shaped like
    (updates, (mu, nu, nu_max)).
    """
    tiny = float(jnp.finfo(jnp.float16).smallest_normal)

    def mask(mu, nu):
        lost = np.zeros(np.shape(nu), bool)
        if float16_params:
            lost |= np.asarray(nu, np.float64) < tiny
        if float16_mu:
            lost |= np.asarray(mu, np.float64) < tiny
        return lost

    lost = jax.tree.map(mask, magnitude_state.mu, magnitude_state.nu)
    return lost, (lost, lost, lost)


def _ulps(actual, expected, scale, dtype=None) -> float:
    dtype = jnp.dtype(dtype or actual.dtype)
    a = np.asarray(actual, np.float64)
    e = np.asarray(expected, np.float64)
    if a.size == 0:
        return 0.0
    finfo = jnp.finfo(dtype)
    magnitude = np.maximum(np.abs(e), np.abs(np.asarray(scale, np.float64)))
    exponent = np.floor(np.log2(np.maximum(magnitude, float(finfo.smallest_normal))))
    with np.errstate(invalid="ignore"):
        error = np.abs(a - e) / np.exp2(exponent - finfo.nmant)
    agree = (np.isnan(a) & np.isnan(e)) | (np.isinf(a) & (a == e))
    error = np.where(agree, 0.0, error)
    return float(np.nan_to_num(error, nan=np.inf).max())


def _worst(
    actual_tree,
    expected_tree,
    scale_tree,
    dtype=None,
    excluded_tree=None,
    drop_non_finite=False,
):
    """(max ULPs, the dtype they are counted in, elements left out).

    `dtype` counts ULPs of that dtype instead of each output's own.
    `excluded_tree` (bool masks like the outputs) marks elements where the
    contender is known to have lost the value (optax leaving float16's range),
    and `drop_non_finite` its NaN/inf against a finite spec value (optax's
    float16 eps is 0): those are counted as left out rather than as errors.
    """
    worst, worst_dtype, left_out = 0.0, dtype or "float32", 0
    leaves = [jax.tree.leaves(t) for t in (actual_tree, expected_tree, scale_tree)]
    if excluded_tree is None:
        excluded = [False] * len(leaves[0])
    else:
        excluded = jax.tree.leaves(excluded_tree)
    for a, e, s, out in zip(*leaves, excluded, strict=True):
        if a.dtype != e.dtype:
            raise AssertionError(f"dtype {a.dtype} != spec's {e.dtype}")
        a64, e64 = np.asarray(a, np.float64), np.asarray(e, np.float64)
        drop = np.zeros(a64.shape, bool)
        if excluded_tree is not None:
            drop = drop | np.asarray(out)
        if drop_non_finite:
            drop = drop | (~np.isfinite(a64) & np.isfinite(e64))
        drop = np.broadcast_to(drop, a64.shape)
        left_out += int(drop.sum())
        keep = ~drop
        ulps = _ulps(
            a64[keep],
            e64[keep],
            np.broadcast_to(np.asarray(s, np.float64), keep.shape)[keep],
            dtype or a.dtype,
        )
        if ulps >= worst:
            worst, worst_dtype = ulps, jnp.dtype(dtype or a.dtype).name
    return worst, worst_dtype, left_out


def verify(
    params=None,
    steps: int = 3,
    learning_rate: float = 1e-3,
    implementations=("pallas", "xla"),
) -> list[Row]:
    """Runs the comparison grid; returns one row per configuration and contender."""
    params = default_params() if params is None else params
    spec_update = jax.jit(spec.update, static_argnums=2)
    spec_step = jax.jit(spec.step, static_argnums=3)
    rows = []
    for param_dtype, mu_name in itertools.product(PARAM_DTYPES, MU_DTYPES):
        mu_dtype = None if mu_name is None else jnp.dtype(mu_name)
        typed = jax.tree.map(lambda p, d=param_dtype: jnp.asarray(p, d), params)
        hp = spec.Hyperparams(learning_rate, mu_dtype=mu_dtype)
        contenders = {
            impl: _transform.amsgrad(
                learning_rate, mu_dtype=mu_dtype, implementation=impl
            )
            for impl in implementations
        }
        updates_fns = {name: jax.jit(opt.update) for name, opt in contenders.items()}
        step_fns = {name: jax.jit(opt.step) for name, opt in contenders.items()}
        optax_update = jax.jit(optax.amsgrad(learning_rate, mu_dtype=mu_dtype).update)
        # optax rounds intermediates to the leaf dtype and keeps b1 * mu in
        # mu_dtype: its error is counted in the one with fewer mantissa bits.
        narrowest = min(
            (param_dtype, mu_name or param_dtype), key=lambda d: jnp.finfo(d).nmant
        )
        worst = dict.fromkeys([*contenders, "optax"])
        state = spec.init(typed, mu_dtype)
        rng = np.random.default_rng(1)
        for step in range(steps):
            zero = step == steps // 2
            grads = jax.tree.map(
                lambda p, z=zero, rng=rng: jnp.asarray(
                    rng.normal(0, 0.01, p.shape) * (not z), p.dtype
                ),
                typed,
            )
            expected = spec_update(grads, state, hp)
            expected_params, _ = spec_step(grads, state, typed, hp)
            scale_updates, scale_state = spec_update(
                jax.tree.map(jnp.abs, grads),
                state._replace(mu=jax.tree.map(jnp.abs, state.mu)),
                hp,
            )
            scale_params = jax.tree.map(
                lambda p, u: (
                    jnp.abs(p).astype(jnp.float32) + jnp.abs(u).astype(jnp.float32)
                ),
                typed,
                scale_updates,
            )
            scales = (scale_updates, tuple(scale_state)[1:], scale_params)
            optax_state = (optax.ScaleByAmsgradState(*state), optax.EmptyState())
            for name in contenders:
                updates, new_state = updates_fns[name](grads, optax_state, typed)
                new_params, _ = step_fns[name](grads, optax_state, typed)
                got = (updates, tuple(new_state[0])[1:], new_params)
                want = (expected[0], tuple(expected[1])[1:], expected_params)
                worst[name] = _combine(worst[name], _worst(got, want, scales))
            optax_updates, (optax_new, _) = optax_update(grads, optax_state, typed)
            lost = _out_of_float16_range(
                scale_state, param_dtype == "float16", mu_name == "float16"
            )
            worst["optax"] = _combine(
                worst["optax"],
                _worst(
                    (optax_updates, tuple(optax_new)[1:]),
                    (expected[0], tuple(expected[1])[1:]),
                    scales[:2],
                    dtype=narrowest,
                    excluded_tree=lost,
                    drop_non_finite=param_dtype == "float16",
                ),
            )
            state = expected[1]
        for name, (ulps, dtype, left_out) in worst.items():
            bounds = OPTAX_ULPS if name == "optax" else IMPLEMENTATION_ULPS
            note = ""
            if left_out:
                note = f"{left_out} values out of float16's range in optax left out"
            rows.append(
                Row(
                    params=param_dtype,
                    mu_dtype=mu_name or "param",
                    contender=name,
                    max_ulps=ulps,
                    ulp_dtype=dtype,
                    bound=bounds[dtype],
                    passed=ulps <= bounds[dtype],
                    left_out=left_out,
                    note=note,
                )
            )
    return rows


def _combine(a, b):
    """Worst of two (ulps, dtype, left_out) results, left-out counts summed."""
    if a is None:
        return b
    ulps, dtype = max(a[:2], b[:2], key=lambda r: r[0])
    return ulps, dtype, a[2] + b[2]


def report(rows: list[Row], *, params, source: str, steps: int, learning_rate) -> dict:
    """The whole run as plain data: environment, inputs, rows and a summary."""
    leaves = jax.tree.leaves(params)
    failed = sum(not r.passed for r in rows)
    return {
        "environment": environment(),
        "inputs": {
            "params": source,
            "leaves": len(leaves),
            "parameters": int(sum(np.size(x) for x in leaves)),
            "steps": steps,
            "learning_rate": learning_rate,
            "gradients": "N(0, 0.01) per step, seed 1; step steps//2 is zero",
        },
        "rows": [dataclasses.asdict(r) for r in rows],
        "passed": len(rows) - failed,
        "failed": failed,
    }


def format_table(run: dict) -> str:
    """The report as the table the command prints."""
    env, inputs = run["environment"], run["inputs"]
    header = (
        f"{'params':<9} {'mu_dtype':<9} {'vs spec':<8} {'max ULPs':>9} "
        f"{'in':<9} {'bound':>5}  result"
    )
    lines = [
        f"pallas-amsgrad verify on {env['backend']} ({env['devices']}), "
        f"jax {env['jax']}, optax {env['optax']}",
        f"params: {inputs['params']} ({inputs['leaves']} leaves, "
        f"{inputs['parameters']} parameters), {inputs['steps']} steps",
        header,
        "-" * len(header),
    ]
    for r in run["rows"]:
        lines.append(
            f"{r['params']:<9} {r['mu_dtype']:<9} {r['contender']:<8} "
            f"{r['max_ulps']:>9.3g} {r['ulp_dtype']:<9} {r['bound']:>5}  "
            f"{'pass' if r['passed'] else 'FAIL'}  {r['note']}".rstrip()
        )
    lines.append(f"{run['passed']} passed, {run['failed']} failed")
    return "\n".join(lines)
