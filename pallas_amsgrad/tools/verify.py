"""`pallas-amsgrad verify`: kernel, XLA path, spec and optax, side by side.

Every configuration of param dtype x mu_dtype runs N steps (one with a zero
gradient) on a model-shaped pytree, and so do float32 params with nu and
nu_max in bfloat16 (`nu_dtype`); for each param dtype, the AdamW-style
recipe (clipping, masked weight decay, skips of non-finite steps) runs one
step more, a skipped step with a NaN gradient right after the zero one; and
16-bit params and state run with stochastic rounding (options "sr"). Each
step starts every contender from the same state and is compared with the
spec, in ULPs of the output dtype counted at the magnitude of the summands
(`pallas_amsgrad.tools.ulps`); counts and the finite guard's bookkeeping
must match exactly. optax is the composition the options stand for
(`tools.composition`), except where none does: optax has no nu_dtype and
no stochastic rounding, and
with float16 params its global norm is summed in float16, where a model's
gradients overflow it (the spec sums in float32).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import TextIO

import jax
import jax.numpy as jnp
import numpy as np

import amsgrad_spec as spec
import pallas_amsgrad
from pallas_amsgrad import _implementations
from pallas_amsgrad.tools import composition, ulps, workloads
from pallas_amsgrad.tools.environment import describe_revision, environment

PARAM_DTYPES = ("float32", "bfloat16", "float16")
MU_DTYPES = (None, "bfloat16", "float16", "float32")
DEFAULT_MODEL = "transformer-tiny"
# The contenders besides optax: the kernel and the XLA path.
IMPLEMENTATIONS = ("pallas", "xla")


def decay_matrices(params):
    """The recipe's decay mask: matrices and larger, not biases, scales or norms."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


# The AdamW-style recipe's options, as `pallas_amsgrad.amsgrad` takes them.
# The default model's gradients have a global norm near 4 (near 700 with
# float16 params' larger ones), so the clip is active.
RECIPE = {
    "weight_decay": 0.1,
    "mask": decay_matrices,
    "max_grad_norm": 1.0,
    "max_consecutive_errors": 2,
}

# optax rounds intermediates to the narrowest dtype of the configuration (e.g.
# b1 * mu in a bfloat16 mu), so its error is counted in that dtype's ULPs; in
# float32 it is held to the deployed implementations' bound.
OPTAX_ULPS = ulps.DEPLOYED_IMPLEMENTATION_ULPS | ulps.SPEC_VS_OPTAX_ULPS

# Gradients: N(0, 0.01), as a trained model's are. With float16 params,
# optax's (1-b2) g**2 of such gradients is subnormal in float16 and would be
# left out of the comparison: those rows draw magnitudes from [0.5, 4]
# instead (random signs), where it stays in float16's normal range.
GRADIENT_STD = 0.01
FLOAT16_GRADIENT_MAGNITUDES = (0.5, 4.0)


def default_params(seed: int = 0, full: bool = True) -> dict[str, np.ndarray]:
    """`transformer-tiny`'s leaves, N(0, 0.05) in float32; all of them, or
    (`full=False`) one leaf of each kind, `QUICK_LEAVES`."""
    rng = np.random.default_rng(seed)
    params = {
        name: rng.normal(0, 0.05, shape).astype(np.float32)
        for name, shape in workloads.MODELS[DEFAULT_MODEL]().items()
    }
    return params if full else {name: params[name] for name in QUICK_LEAVES}


def default_source(full: bool) -> str:
    """The default params' description in the report."""
    if full:
        return f"embedded {DEFAULT_MODEL}"
    return f"embedded {DEFAULT_MODEL}, one leaf of each kind"


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


@dataclasses.dataclass(frozen=True)
class Configuration:
    param_dtype: str
    mu_name: str | None  # None: mu in the params' dtype, as optax.
    nu_name: str | None = None  # nu_dtype; None: as optax.
    recipe: bool = False  # With the RECIPE options.
    stochastic: bool = False  # 16-bit stores rounded stochastically.

    @property
    def quantized(self) -> bool:
        """8-bit block-quantized mu or nu (`mu_dtype=int8`, `nu_dtype=uint8`)."""
        return "int8" in (self.mu_name, self.nu_name) or "uint8" in (
            self.mu_name,
            self.nu_name,
        )

    @property
    def with_optax(self) -> bool:
        """optax has no nu_dtype nor stochastic rounding nor 8-bit state, and
        sums float16 gradients' norm in float16."""
        return (
            self.nu_name is None
            and not self.stochastic
            and not self.quantized
            and not (self.recipe and self.param_dtype == "float16")
        )

    @property
    def options(self) -> str:
        return "recipe" if self.recipe else "sr" if self.stochastic else "-"

    def describe(self) -> str:
        return (
            f"{self.param_dtype} params, mu_dtype {self.mu_name or 'param'}"
            f"{f', nu_dtype {self.nu_name}' if self.nu_name else ''}"
            f"{', recipe' * self.recipe}"
            f"{', stochastic rounding' * self.stochastic}"
        )


CONFIGURATIONS = (
    *(Configuration(p, m) for p, m in itertools.product(PARAM_DTYPES, MU_DTYPES)),
    # 16-bit nu and nu_max for float32 params (bfloat16 params already have it).
    *(Configuration("float32", m, "bfloat16") for m in (None, "bfloat16")),
    *(Configuration(p, None, recipe=True) for p in PARAM_DTYPES),
    # Stochastic rounding of every 16-bit store: bfloat16 and float16 params
    # and state, and float32 params with bfloat16 moments.
    *(Configuration(p, None, stochastic=True) for p in ("bfloat16", "float16")),
    Configuration("float32", "bfloat16", "bfloat16", stochastic=True),
    # 8-bit block-quantized state (docs/quantized-state.md): float32 and
    # bfloat16 params, with the recipe, and rounded stochastically.
    *(Configuration(p, "int8", "uint8") for p in ("float32", "bfloat16")),
    Configuration("float32", "int8", "uint8", recipe=True),
    Configuration("bfloat16", "int8", "uint8", stochastic=True),
)
# The default run, a representative subset: every param dtype with its
# default mu_dtype, and one row each of the recipe, the lean state and
# stochastic rounding (`--full` runs CONFIGURATIONS).
QUICK_CONFIGURATIONS = (
    *(Configuration(p, None) for p in PARAM_DTYPES),
    Configuration("float32", None, recipe=True),
    Configuration("float32", "bfloat16", "bfloat16"),
    Configuration("bfloat16", None, stochastic=True),
    Configuration("float32", "int8", "uint8"),
)
# The quick run's leaves of DEFAULT_MODEL, one of each kind the kernels
# block differently: rows of 64 lanes, a matrix wider than 128 lanes, a
# vector longer than 128 and not a multiple of it, a vector shorter than one
# row of 128, a scalar. Compile time grows with the number of leaves.
QUICK_LEAVES = (
    "embed",
    "layer0.attention.qkv",
    "layer0.attention.qkv_bias",
    "final_norm.scale",
    "temperature",
)
# The seed of the stochastic rounding rows.
SEED = 0


@dataclasses.dataclass
class Row:
    """One contender on one configuration, compared with the spec."""

    params: str
    mu_dtype: str
    contender: str
    max_ulps: float
    ulp_dtype: str  # The dtype whose ULPs `max_ulps` counts.
    bound: int
    passed: bool  # Within the bound, with at least one value compared.
    compared: int = 0  # Output values compared with the spec.
    left_out: int = 0  # optax values out of float16's range, not compared.
    note: str = ""
    options: str = "-"  # "recipe": the RECIPE options; "sr": stochastic rounding.
    nu_dtype: str = "param"


def _out_of_float16_range(magnitude_state, float16_params, float16_mu):
    """Masks of outputs where optax, and not the spec, leaves float16's range.

    With float16 params optax's (1-b2) g**2 can go subnormal (and its eps=1e-8
    is 0, so a zero gradient gives 0/0); with a float16 mu, its b1 * mu can.
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


@dataclasses.dataclass
class _Worst:
    """The largest error over a configuration's steps, and what was compared."""

    ulps: float = 0.0
    dtype: str = "float32"  # The dtype whose ULPs `ulps` counts.
    compared: int = 0
    left_out: int = 0
    mismatches: list[str] = dataclasses.field(default_factory=list)
    codes_compared: int = 0
    codes_one_apart: int = 0  # 8-bit codes one code from the spec's.

    def add_quantized(
        self,
        actual_tree,
        expected_tree,
        scale_tree,
        exact_tree,
        roundings,
        bound,
        block,
    ) -> None:
        """Adds one step's moments where some are 8-bit. Their scales must
        equal the spec's, and their codes too, except one code off where the
        spec's exact value (`exact_tree`, before it is stored) lies within
        `bound` float32 ULPs of the threshold between the two codes (to
        nearest: their midpoint; up: the lower code's value), where a
        last-bit difference of the float step may cross it; stochastic
        rounding's thresholds are random, so there one code off is allowed.
        Float moments (small leaves) as `add`. `roundings` are the three
        moments' ("nearest", "up" or "stochastic"); `block` the quantization
        block."""

        def is_moment(x):
            return isinstance(x, spec.QuantizedMoment)

        for rounding, moments in zip(
            roundings,
            zip(actual_tree, expected_tree, scale_tree, exact_tree, strict=True),
            strict=True,
        ):
            leaves = [jax.tree.leaves(t, is_leaf=is_moment) for t in moments]
            for a, e, s, x in zip(*leaves, strict=True):
                if not is_moment(e):
                    self.add(a, e, s)
                    continue
                self._add_codes(a, e, x, rounding, bound, block)

    def _add_codes(self, actual, expected, exact, rounding, bound, block) -> None:
        a_scales, e_scales = np.asarray(actual.scales), np.asarray(expected.scales)
        if not np.array_equal(a_scales, e_scales):
            blocks = int(np.sum(a_scales != e_scales))
            self.mismatches.append(f"{blocks} block scales != spec's")
            return
        codes = np.asarray(actual.codes, np.int32)
        apart = np.abs(codes - np.asarray(expected.codes, np.int32))
        self.codes_compared += apart.size
        off = apart != 0
        if not off.any():
            return
        code_map = spec.MU_MAP if expected.codes.dtype == jnp.int8 else spec.NU_MAP
        values = [  # The scales are equal: both codes read on them.
            np.asarray(spec.dequantize(c, expected.scales, code_map, block), np.float64)
            for c in (actual.codes, expected.codes)
        ]
        x = np.asarray(exact, np.float32)
        if rounding == "nearest":
            threshold = (values[0] + values[1]) / 2
        else:
            threshold = np.minimum(values[0], values[1])
        ulp = np.spacing(np.abs(x)).astype(np.float64)
        near = np.abs(x.astype(np.float64) - threshold) <= bound * ulp
        allowed = (apart <= 1) & (near | (rounding == "stochastic"))
        self.codes_one_apart += int(np.sum(off & allowed))
        if not np.all(allowed[off]):
            worst = int(apart.max())
            self.mismatches.append(
                f"{int(np.sum(off & ~allowed))} codes ({rounding}) off the "
                f"spec's away from a rounding threshold (up to {worst} apart)"
            )

    def add_exact(self, actual, expected, what: str) -> None:
        """Adds values that must match exactly (counts, the guard's flags)."""
        if not np.array_equal(np.asarray(actual), np.asarray(expected)):
            self.mismatches.append(f"{what} {actual} != spec's {expected}")

    def add(
        self,
        actual_tree,
        expected_tree,
        scale_tree,
        dtype=None,
        excluded_tree=None,
        drop_non_finite=False,
    ) -> None:
        """Adds one step's outputs.

        `dtype` counts ULPs of that dtype instead of each output's own.
        `excluded_tree` (bool masks like the outputs) marks elements where the
        contender is known to have lost the value (optax leaving float16's
        range), and `drop_non_finite` its NaN/inf against a finite spec value
        (optax's float16 eps is 0): those are left out rather than errors.
        """
        leaves = [jax.tree.leaves(t) for t in (actual_tree, expected_tree, scale_tree)]
        excluded = (
            [None] * len(leaves[0])
            if excluded_tree is None
            else jax.tree.leaves(excluded_tree)
        )
        for a, e, s, out in zip(*leaves, excluded, strict=True):
            if a.dtype != e.dtype:
                raise AssertionError(f"dtype {a.dtype} != spec's {e.dtype}")
            a64, e64 = np.asarray(a, np.float64), np.asarray(e, np.float64)
            drop = np.zeros(a64.shape, bool)
            if out is not None:
                drop = drop | np.asarray(out)
            if drop_non_finite:
                drop = drop | (~np.isfinite(a64) & np.isfinite(e64))
            keep = ~np.broadcast_to(drop, a64.shape)
            self.left_out += int(a64.size - keep.sum())
            self.compared += int(keep.sum())
            if not keep.any():
                continue
            scale = np.broadcast_to(np.asarray(s, np.float64), keep.shape)[keep]
            error = ulps.scaled_ulp_error(
                a64[keep], e64[keep], scale, dtype or a.dtype
            ).max()
            if error >= self.ulps:
                self.ulps, self.dtype = float(error), jnp.dtype(dtype or a.dtype).name


def _gradients(typed_params, param_dtype, rng, zero, nan=False):
    """One step's gradients; `nan` puts a NaN in the first element of the
    largest leaf."""

    def draw(p):
        if param_dtype == "float16":
            low, high = np.log(FLOAT16_GRADIENT_MAGNITUDES)
            magnitude = np.exp(rng.uniform(low, high, p.shape))
            g = magnitude * rng.choice([-1.0, 1.0], p.shape)
        else:
            g = rng.normal(0, GRADIENT_STD, p.shape)
        return g * (not zero)

    grads = jax.tree.map(draw, typed_params)
    if nan:
        largest = max(jax.tree.leaves(grads), key=np.size)
        largest.flat[0] = np.nan
    return jax.tree.map(lambda g, p: jnp.asarray(g, p.dtype), grads, typed_params)


def _amsgrad_part(spec_state) -> spec.AmsgradState:
    """A spec state's AMSGrad part, with or without the finite guard."""
    return getattr(spec_state, "inner_state", spec_state)


def _moments(spec_state) -> tuple:
    inner = _amsgrad_part(spec_state)
    return (inner.mu, inner.nu, inner.nu_max)


def _bookkeeping(spec_state) -> dict:
    """The state's exact fields: the count, and the finite guard's."""
    exact = {"count": _amsgrad_part(spec_state).count}
    if isinstance(spec_state, spec.FiniteGuardState):
        exact |= spec_state._asdict()
        del exact["inner_state"]
    return exact


def verify(
    params=None,
    steps: int = 3,
    learning_rate: float = 1e-3,
    implementations: Sequence | None = None,
    on_row: Callable[[Row], None] | None = None,
    progress: TextIO | None = None,
    configurations: Sequence[Configuration] = QUICK_CONFIGURATIONS,
    jobs: int | None = None,
) -> list[Row]:
    """Runs the comparison on `configurations`; returns one row per
    configuration and contender, in their order.

    `implementations` are names or implementation objects (each row is named
    by the object's `name`); None: `IMPLEMENTATIONS`.

    `on_row` is called with each row as its configuration finishes, in order;
    `progress` (e.g. sys.stderr) gets a line as each configuration starts.
    `jobs` configurations run at once, in threads (None: one more than the
    cores): most of a configuration's time is XLA compiling, which runs
    beside another's tracing.
    """
    if jobs is None:
        jobs = (os.cpu_count() or 1) + 1
    params = default_params() if params is None else params
    implementations = [
        _for_this_device(impl) for impl in implementations or IMPLEMENTATIONS
    ]
    # One program per configuration each, rather than an op at a time.
    reference = jax.jit(_reference, static_argnums=3)
    exact_moments = jax.jit(_exact_moments, static_argnums=3)
    optax_state_of = jax.jit(composition.optax_state_of, static_argnums=1)
    start = time.perf_counter()

    def run(number, config):
        if progress is not None:
            print(
                f"[{number}/{len(configurations)}] {config.describe()}; "
                f"{time.perf_counter() - start:.1f} s elapsed",
                file=progress,
                flush=True,
            )
        return _verify_configuration(
            config,
            params,
            steps,
            learning_rate,
            implementations,
            reference,
            exact_moments,
            optax_state_of,
        )

    rows = []

    def finished(config_rows):
        for row in config_rows:
            rows.append(row)
            if on_row is not None:
                on_row(row)

    numbered = list(enumerate(configurations, 1))
    if jobs <= 1:  # In order: each progress line right before its rows.
        for number, config in numbered:
            finished(run(number, config))
        return rows
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        for future in [pool.submit(run, *item) for item in numbered]:
            finished(future.result())
    return rows


def _for_this_device(implementation):
    """The kernel, named "pallas", lowered for the device the steps run on
    alone (its rows are still "pallas"): tracing the other platforms'
    kernels would take most of its time."""
    if implementation != "pallas":
        return implementation
    device = _implementations.placed_device(())
    platform = _implementations.Target.of(device).platform
    return pallas_amsgrad.Pallas(platforms=(platform,))


def _verify_configuration(
    config: Configuration,
    params,
    steps: int,
    learning_rate: float,
    implementations: Sequence,
    reference: Callable,
    exact_moments: Callable,
    optax_state_of: Callable,
) -> list[Row]:
    """One configuration's rows: each contender's worst error over the steps."""
    param_dtype, mu_name = config.param_dtype, config.mu_name
    mu_dtype = None if mu_name is None else jnp.dtype(mu_name)
    typed = jax.tree.map(lambda p, d=param_dtype: jnp.asarray(p, d), params)
    hp = spec.Hyperparams(
        learning_rate,
        mu_dtype=mu_dtype,
        nu_dtype=config.nu_name and jnp.dtype(config.nu_name),
        stochastic_rounding=config.stochastic,
        seed=SEED,
        **(RECIPE if config.recipe else {}),
    )
    contenders = {
        getattr(impl, "name", impl): pallas_amsgrad.amsgrad(
            **composition.pallas_kwargs(hp), implementation=impl
        )
        for impl in implementations
    }
    updates_fns = {name: jax.jit(opt.update) for name, opt in contenders.items()}
    step_fns = {name: jax.jit(opt.step) for name, opt in contenders.items()}
    with_optax = config.with_optax
    if with_optax:
        optax_update = jax.jit(composition.optimizer(hp).update)
        # optax rounds intermediates to the leaf dtype and keeps b1 * mu in
        # mu_dtype: its error is counted in the one with fewer mantissa bits.
        narrowest = min(
            (param_dtype, mu_name or param_dtype), key=lambda d: jnp.finfo(d).nmant
        )
    worst = {name: _Worst() for name in contenders}
    if with_optax:
        worst["optax"] = _Worst()
    state = spec.init_state(typed, hp)
    rng = np.random.default_rng(1)
    for step in range(steps + config.recipe):
        # The zero gradient comes after at least one real step; the
        # recipe's NaN right after it.
        zero = steps > 1 and step == steps // 2
        nan = config.recipe and step == steps // 2 + 1
        grads = _gradients(typed, param_dtype, rng, zero, nan)
        expected, want, scale_new, scales = reference(grads, state, typed, hp)
        if config.quantized:
            exact = exact_moments(grads, state, typed, hp)
        contender_state = optax_state_of(state, hp, typed)
        for name in contenders:
            updates, new_state = updates_fns[name](grads, contender_state, typed)
            new_params, _ = step_fns[name](grads, contender_state, typed)
            new_state = composition.spec_state_of(new_state, hp)
            if config.quantized:
                worst[name].add((updates, new_params), want[::2], scales[::2])
                worst[name].add_quantized(
                    _moments(new_state),
                    want[1],
                    scales[1],
                    exact,
                    ("stochastic" if config.stochastic else "nearest",) * 2 + ("up",),
                    ulps.DEPLOYED_IMPLEMENTATION_ULPS["float32"],
                    hp.quantization_block,
                )
            else:
                worst[name].add(
                    (updates, _moments(new_state), new_params), want, scales
                )
            _add_bookkeeping(worst[name], new_state, expected[1])
        if with_optax:
            optax_updates, optax_new = optax_update(grads, contender_state, typed)
            optax_new = composition.spec_state_of(optax_new, hp)
            lost = _out_of_float16_range(
                _amsgrad_part(scale_new),
                param_dtype == "float16",
                mu_name == "float16",
            )
            worst["optax"].add(
                (optax_updates, _moments(optax_new)),
                want[:2],
                scales[:2],
                dtype=narrowest,
                excluded_tree=lost,
                drop_non_finite=param_dtype == "float16",
            )
            _add_bookkeeping(worst["optax"], optax_new, expected[1])
        state = expected[1]
    return [_row(config, name, result) for name, result in worst.items()]


def _reference(grads, state, params, hp):
    """The spec's step: (its update and new state, the outputs compared (the
    update, the moments and the new params), the state of the step on
    magnitudes, and the summands' magnitudes for each output (the step on
    |g|, |mu| and |params|))."""
    expected = spec.update(grads, state, hp, params)
    expected_params, _ = spec.step(grads, state, params, hp)
    scale_updates, scale_new = spec.update(
        jax.tree.map(jnp.abs, grads),
        _with_abs_mu(state),
        hp,
        jax.tree.map(jnp.abs, params),
    )
    scale_params = jax.tree.map(
        lambda p, u: jnp.abs(p).astype(jnp.float32) + jnp.abs(u).astype(jnp.float32),
        params,
        scale_updates,
    )
    scales = (scale_updates, _moments(scale_new), scale_params)
    want = (expected[0], _moments(expected[1]), expected_params)
    return expected, want, scale_new, scales


def _exact_moments(grads, state, params, hp):
    """The spec's new moments before an 8-bit store: its step from the same
    state read back, with float32 storage where `hp` has 8 bits."""

    def wide(dtype):
        quantized = dtype is not None and jnp.dtype(dtype) in (
            jnp.dtype(jnp.int8),
            jnp.dtype(jnp.uint8),
        )
        return jnp.float32 if quantized else dtype

    float_hp = dataclasses.replace(
        hp, mu_dtype=wide(hp.mu_dtype), nu_dtype=wide(hp.nu_dtype)
    )
    is_moment = lambda x: isinstance(x, spec.QuantizedMoment)  # noqa: E731
    read = jax.tree.map(
        lambda x: spec.read_moment(x, hp) if is_moment(x) else x,
        state,
        is_leaf=is_moment,
    )
    return _moments(spec.update(grads, read, float_hp, params)[1])


def _with_abs_mu(spec_state):
    """`spec_state` with |mu| for mu."""
    inner = _amsgrad_part(spec_state)
    inner = inner._replace(mu=jax.tree.map(jnp.abs, inner.mu))
    if isinstance(spec_state, spec.FiniteGuardState):
        return spec_state._replace(inner_state=inner)
    return inner


def _add_bookkeeping(worst: _Worst, actual_state, expected_state) -> None:
    actual, expected = _bookkeeping(actual_state), _bookkeeping(expected_state)
    for field, value in expected.items():
        worst.add_exact(actual[field], value, field)


def _row(config: Configuration, contender: str, result: _Worst) -> Row:
    """A contender's row: it passes within its bound, having compared values,
    with its counts and flags exact."""
    bounds = OPTAX_ULPS if contender == "optax" else ulps.DEPLOYED_IMPLEMENTATION_ULPS
    if config.recipe:
        bounds = ulps.for_recipe(
            bounds, clips=True, decays=True, optax=contender == "optax"
        )
    bound = bounds[result.dtype]
    notes = list(result.mismatches)
    if result.left_out:
        notes.append(
            f"{result.left_out} values out of float16's range in optax left out"
        )
    if result.codes_compared:
        notes.append(
            f"{result.codes_compared} 8-bit codes, {result.codes_one_apart} one "
            "code from the spec's"
        )
    if not result.compared:
        notes.append("no values compared")
    return Row(
        params=config.param_dtype,
        mu_dtype=config.mu_name or "param",
        nu_dtype=config.nu_name or "param",
        contender=contender,
        max_ulps=result.ulps,
        ulp_dtype=result.dtype,
        bound=bound,
        passed=result.compared > 0 and result.ulps <= bound and not result.mismatches,
        compared=result.compared,
        left_out=result.left_out,
        note="; ".join(notes),
        options=config.options,
    )


def report(
    rows: list[Row], *, params, source: str, steps: int, learning_rate, full: bool
) -> dict:
    """The whole run as plain data: environment, inputs, rows and a summary."""
    failed = sum(not r.passed for r in rows)
    return {
        "environment": environment(),
        "inputs": inputs(params, source, steps, learning_rate, full),
        "rows": [dataclasses.asdict(r) for r in rows],
        "passed": len(rows) - failed,
        "failed": failed,
    }


def inputs(params, source: str, steps: int, learning_rate, full: bool) -> dict:
    leaves = jax.tree.leaves(params)
    low, high = FLOAT16_GRADIENT_MAGNITUDES
    configurations = configurations_for(full)
    return {
        "grid": "full" if full else "quick",
        "configurations": [c.describe() for c in configurations],
        "params": source,
        "leaves": len(leaves),
        "parameters": int(sum(np.size(x) for x in leaves)),
        "steps": steps,
        "learning_rate": learning_rate,
        "gradients": f"N(0, {GRADIENT_STD}) per step (float16 params: magnitudes "
        f"log-uniform in [{low}, {high}], random signs), seed 1; with 2 or more "
        "steps, step steps//2 is zero; recipe rows run one step more, with a "
        "NaN in the largest leaf at step steps//2 + 1",
        "recipe": {k: getattr(v, "__name__", v) for k, v in RECIPE.items()},
    }


def format_header(environment_: dict, inputs_: dict) -> list[str]:
    """The table's header lines, printable before any row is measured."""
    header = (
        f"{'params':<9} {'mu_dtype':<9} {'nu_dtype':<9} {'options':<7} "
        f"{'vs spec':<8} {'max ULPs':>9} "
        f"{'in':<9} {'bound':>5}  result"
    )
    count = len(inputs_["configurations"])
    grid = (
        f"the full grid, {count} configurations"
        if inputs_["grid"] == "full"
        else f"quick: {count} of {len(CONFIGURATIONS)} configurations, --full for all"
    )
    return [
        f"pallas-amsgrad verify ({grid}) on {environment_['backend']} "
        f"({environment_['devices']}), jax {environment_['jax']}, "
        f"optax {environment_['optax']}, {describe_revision(environment_)}",
        f"params: {inputs_['params']} ({inputs_['leaves']} leaves, "
        f"{inputs_['parameters']} parameters), {inputs_['steps']} steps",
        header,
        "-" * len(header),
    ]


def format_row(r: dict) -> str:
    return (
        f"{r['params']:<9} {r['mu_dtype']:<9} {r['nu_dtype']:<9} {r['options']:<7} "
        f"{r['contender']:<8} "
        f"{r['max_ulps']:>9.3g} {r['ulp_dtype']:<9} {r['bound']:>5}  "
        f"{'pass' if r['passed'] else 'FAIL'}  {r['note']}".rstrip()
    )


def format_summary(run: dict) -> str:
    return f"{run['passed']} passed, {run['failed']} failed"


def format_table(run: dict) -> str:
    """The report as the table the command prints."""
    return "\n".join(
        [
            *format_header(run["environment"], run["inputs"]),
            *(format_row(r) for r in run["rows"]),
            format_summary(run),
        ]
    )


def configurations_for(full: bool) -> tuple[Configuration, ...]:
    return CONFIGURATIONS if full else QUICK_CONFIGURATIONS


def run_command(
    params,
    source: str,
    steps: int,
    learning_rate: float,
    stream: bool,
    full: bool = False,
    jobs: int | None = None,
) -> dict:
    """`verify` as the command runs it: with `stream`, the header at once and
    each row as it finishes on stdout, progress on stderr."""
    on_row = None
    if stream:
        print(
            "\n".join(
                format_header(
                    environment(), inputs(params, source, steps, learning_rate, full)
                )
            ),
            flush=True,
        )

        def on_row(row):
            print(format_row(dataclasses.asdict(row)), flush=True)

    start = time.perf_counter()
    rows = verify(
        params=params,
        steps=steps,
        learning_rate=learning_rate,
        on_row=on_row,
        progress=sys.stderr,
        configurations=configurations_for(full),
        jobs=jobs,
    )
    run = report(
        rows,
        params=params,
        source=source,
        steps=steps,
        learning_rate=learning_rate,
        full=full,
    )
    run["seconds"] = round(time.perf_counter() - start, 1)
    if stream:
        print(f"{run['seconds']:.1f} s", file=sys.stderr)
        print(format_summary(run), flush=True)
    return run
