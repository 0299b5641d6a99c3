"""AMSGrad as an executable math spec: the oracle for the fused kernel.

Mirrors `optax.amsgrad` of optax 0.2.8 (Reddi et al., "On the Convergence of
Adam and Beyond"). One small function per equation; `update`, `apply` and
`step` compose them over a pytree. Plain `jax.numpy` only.

With the options of a training recipe (`weight_decay`, `mask`,
`max_grad_norm`, `max_consecutive_errors`) it mirrors the optax composition

    inner = chain(clip_by_global_norm(max_grad_norm),      # if max_grad_norm
                  scale_by_amsgrad(...),
                  add_decayed_weights(weight_decay, mask),  # if not None
                  scale_by_learning_rate(learning_rate))
    apply_if_finite(inner, max_consecutive_errors)          # if an int

with one difference, where optax's composition fails: a skipped step returns
zero updates of the update's dtype, and the old moments in the new moments'
dtypes (optax's `apply_if_finite` returns the gradients' dtype and the old
state's, which `lax.cond` refuses when they differ).

Precision rule
--------------
* Output dtypes are optax's, exactly. They are obtained by evaluating the same
  equations abstractly (`jax.eval_shape`) on the leaves' own dtypes, so the
  spec inherits optax's promotion rules rather than restating them: e.g. a
  bfloat16 leaf with `mu_dtype=float32` gets a float32 update.
* `nu_dtype` (not in optax) is to `nu` and `nu_max` what `mu_dtype` is to
  `mu`: their storage dtype only. The step computes them, and the update
  from them, exactly as without it, and rounds them to `nu_dtype` once, as
  they are stored; the next step reads the rounded values.
* `stochastic_rounding` (not in optax) changes only that one rounding, for the
  values stored in 16 bits (the param in `step`; mu, nu and nu_max): each
  goes to a neighbour at random, unbiased (`rounding.py`). Float32 outputs
  and the updates of `update` are rounded as without it.
* An 8-bit `mu_dtype` (int8) or `nu_dtype` (uint8), not in optax, stores
  that moment block-quantized (`quantization.py`) as a `QuantizedMoment`,
  where the leaf `quantizes` (smaller leaves keep float32). The step reads
  it back exactly as float32, computes as for float32 state, and stores it
  once: mu and nu to the nearest code (stochastically with
  `stochastic_rounding`, by the 16-bit stores' bits), nu_max up, so that it
  never reads back below the exact running maximum.
* Values are computed in the leaves' promoted dtype raised to at least float32
  (float32 for bfloat16/float16/float32 leaves, float64 for float64 leaves)
  and rounded once, to each output's dtype, at the end.

For float32 leaves both rules coincide with optax's arithmetic operation for
operation, so the spec equals optax bitwise. For bfloat16/float16 leaves optax
rounds every intermediate (`(1 - b1) * g`, `b1 * mu`, `1 - b1**t`, the
learning rate, ...) to the leaf dtype; the spec rounds once, which is more
accurate and avoids optax's float16 NaN for a zero gradient (`eps=1e-8` is 0 in
float16, so optax computes 0 / 0). The bias corrections `1 - b**t` are computed
as optax computes them (float32 for a Python float `b` and an int32 count) and
cast to the dtype the moment is computed in.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from .quantization import (
    MU_MAP,
    NU_MAP,
    QUANTIZATION_BLOCK,
    dequantize,
    quantize,
    quantizes,
)
from .rounding import (
    MU,
    NU,
    NU_MAX,
    PARAM,
    leaf_id,
    random_bits,
    stochastic_round,
    stream_key,
)

Schedule = Callable[[jax.Array], jax.typing.ArrayLike]


class AmsgradState(NamedTuple):
    """The state of AMSGrad, field for field `optax.ScaleByAmsgradState`."""

    count: jax.Array  # int32 steps taken so far; saturates at the int32 max.
    mu: Any  # First moment, in `mu_dtype` (or the promoted dtype if None).
    nu: Any  # Second moment, in `nu_dtype` (or the parameter dtype if None).
    nu_max: Any  # Running elementwise maximum of the (debiased) second moment,
    # in nu's dtype.


class FiniteGuardState(NamedTuple):
    """The state with `max_consecutive_errors`: field for field
    `optax.ApplyIfFiniteState`, around the AMSGrad state."""

    notfinite_count: jax.Array  # int32 consecutive steps with a NaN or inf.
    last_finite: jax.Array  # bool: whether the last step's gradients were finite.
    total_notfinite: jax.Array  # int32 such steps in all; never reset.
    inner_state: AmsgradState


@dataclasses.dataclass(frozen=True, eq=False)  # A mask pytree is not hashable.
class Hyperparams:
    """The eight hyperparameters of `optax.amsgrad`, with its defaults,
    `nu_dtype`, and the recipe's options (off by default). Hashed by identity, as a static
    jit argument."""

    learning_rate: jax.typing.ArrayLike | Schedule
    b1: jax.typing.ArrayLike = 0.9
    b2: jax.typing.ArrayLike = 0.999
    eps: jax.typing.ArrayLike = 1e-8
    eps_root: jax.typing.ArrayLike = 0.0
    mu_dtype: Any = None
    bias_correction_mu: bool = True
    bias_correction_nu: bool = True
    # The storage dtype of nu and nu_max (not in optax); None: as optax.
    nu_dtype: Any = None
    # Decoupled weight decay, as `optax.add_decayed_weights(weight_decay, mask)`:
    # a scalar or a schedule (a zero too); None adds no term at all.
    weight_decay: jax.typing.ArrayLike | Schedule | None = None
    # A pytree of bools (a prefix of the params') or a callable of the
    # gradients returning one: True where the decay applies.
    mask: Any = None
    # As `optax.clip_by_global_norm(max_grad_norm)`, before the moments.
    max_grad_norm: jax.typing.ArrayLike | None = None
    # As `optax.apply_if_finite(..., max_consecutive_errors)`.
    max_consecutive_errors: int | None = None
    # Not in optax: every value stored in 16 bits (the param in `step`, and
    # mu, nu, nu_max) rounded stochastically (`rounding.stochastic_round`),
    # by bits that `seed`, the count, the leaf and the array determine.
    stochastic_rounding: bool = False
    seed: Any = 0
    # Not in optax: with mu_dtype=int8 and/or nu_dtype=uint8, the moments of
    # leaves that `quantizes` are stored in 8-bit codes with a scale per
    # block of this many elements along the last dimension.
    quantization_block: int = QUANTIZATION_BLOCK

    @property
    def decays(self) -> bool:
        """Whether the decay term exists: anything but None."""
        return self.weight_decay is not None


class QuantizedMoment(NamedTuple):
    """A moment stored in 8 bits (`quantization.quantize`): int8 codes for
    `mu`, uint8 for `nu` and `nu_max`, and one float32 scale per block."""

    codes: jax.Array
    scales: jax.Array


_QUANTIZED = (jnp.dtype(jnp.int8), jnp.dtype(jnp.uint8))


def storage_dtype(shape, dtype):
    """The dtype a moment of a leaf of `shape` is stored in, for a requested
    `dtype` (mu_dtype, nu_dtype): an 8-bit one only where the leaf
    `quantizes`, else float32; any other as requested."""
    if dtype is None or jnp.dtype(dtype) not in _QUANTIZED:
        return dtype
    return dtype if quantizes(shape) else jnp.float32


def read_moment(moment, hp: Hyperparams):
    """A stored moment as the step reads it: a `QuantizedMoment` dequantized
    to float32 (exactly), any other array as it is."""
    if not isinstance(moment, QuantizedMoment):
        return moment
    code_map = MU_MAP if moment.codes.dtype == jnp.int8 else NU_MAP
    return dequantize(moment.codes, moment.scales, code_map, hp.quantization_block)


# --- The equations, one per function. ---------------------------------------


def first_moment(grad, mu, b1):
    """mu_t = (1 - b1) * g_t + b1 * mu_{t-1}."""
    return (1 - b1) * grad + b1 * mu


def squared_magnitude(grad):
    """|g|^2, elementwise; real for complex g."""
    if jnp.iscomplexobj(grad):
        return (grad.conj() * grad).real
    return grad**2


def second_moment(grad, nu, b2):
    """nu_t = (1 - b2) * |g_t|^2 + b2 * nu_{t-1}."""
    return (1 - b2) * squared_magnitude(grad) + b2 * nu


def increment_count(count):
    """t = t_prev + 1, saturating at the maximum of count's integer dtype."""
    limit = jnp.iinfo(count.dtype).max
    return jnp.where(count < limit, count + 1, jnp.asarray(limit, count.dtype))


def bias_correction(decay, count):
    """c_t = 1 - decay^t, in the dtype jnp promotion gives (float32 for int32 t).

    Jitted with `decay` traced, as optax evaluates it: a traced decay makes
    `decay**t` a float power, where a Python float base would take jnp's
    integer-exponent path and can differ in the last bit.
    """
    return 1 - decay**count


# Wrapped after the definition (not decorated) so mutation testing reaches it.
bias_correction = jax.jit(bias_correction, inline=True)


def debias(moment, correction):
    """moment / c_t, with c_t cast to the moment's dtype first.

    A true IEEE division, as optax gets for a tree of two or more leaves: XLA
    rewrites `x / broadcast(c)` into `x * (1 / c)` (up to 1 ULP off) depending
    on the surrounding graph, and the barrier keeps it from seeing `c` is a
    broadcast scalar.
    """
    divisor = jnp.broadcast_to(correction.astype(moment.dtype), jnp.shape(moment))
    return moment / jax.lax.optimization_barrier(divisor)


def running_max(nu_max, nu_eff):
    """nu_max_t = max(nu_max_{t-1}, nu_eff_t), elementwise."""
    return jnp.maximum(nu_max, nu_eff)


def direction(mu_hat, nu_max, eps, eps_root):
    """d_t = mu_hat_t / (sqrt(nu_max_t + eps_root) + eps)."""
    return mu_hat / (jnp.sqrt(nu_max + eps_root) + eps)


def scale_by_step_size(direction_, step_size, is_schedule):
    """u_t = step_size * d_t; a scheduled step size is cast to d_t's dtype first."""
    if is_schedule:
        step_size = jnp.asarray(step_size, dtype=direction_.dtype)
    return step_size * direction_


def step_size_at(learning_rate, count):
    """-lr, or -lr(t_prev) for a schedule, evaluated before the increment."""
    if callable(learning_rate):
        return -1 * learning_rate(count)
    return -1 * learning_rate


def global_norm(grads):
    """||g|| = sqrt(sum over leaves of sum |g|^2), each leaf's sum computed in
    at least float32 and the leaves' sums added in order."""
    total = 0
    for grad in jax.tree.leaves(grads):
        total = total + jnp.sum(
            squared_magnitude(jnp.asarray(grad, compute_dtype(grad.dtype)))
        )
    return jnp.sqrt(total)


def clip(grad, norm, max_norm):
    """g' = g where ||g|| < max_norm, else (g / ||g||) * max_norm."""
    return jnp.where(norm < max_norm, grad, (grad / norm.astype(grad.dtype)) * max_norm)


def decay_weights(update, param, weight_decay):
    """u' = u + weight_decay * p, before the step size (decoupled decay)."""
    return update + weight_decay * param


def all_finite(grads):
    """Whether every gradient value is finite (no NaN, no inf)."""
    return jnp.all(
        jnp.array([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)])
    )


def consecutive_errors(notfinite_count, finite):
    """n_t = 0 after finite gradients, else n_{t-1} + 1 (saturating)."""
    return jnp.where(finite, jnp.zeros([], jnp.int32), increment_count(notfinite_count))


def accepts(finite, notfinite_count, max_consecutive_errors):
    """A step applies when its gradients are finite, or when more than
    `max_consecutive_errors` steps in a row were not (the guard gives up)."""
    return finite | (notfinite_count > max_consecutive_errors)


def apply_update(param, update):
    """p_t = p_{t-1} + u_t, returned in the parameter's dtype."""
    return jnp.asarray(param + update).astype(jnp.asarray(param).dtype)


# --- Composition over one leaf, then over pytrees. ---------------------------


def _leaf_equations(grad, mu, nu, nu_max, param, scalars, hp, decayed):
    """All equations for one leaf, in whatever dtypes the inputs carry."""
    (bc_mu, bc_nu), step_size, norm, weight_decay = scalars
    if hp.max_grad_norm is not None:
        grad = clip(grad, norm, hp.max_grad_norm)
    mu = first_moment(grad, mu, hp.b1)
    nu = second_moment(grad, nu, hp.b2)
    nu_eff = debias(nu, bc_nu) if hp.bias_correction_nu else nu
    nu_max = running_max(nu_max, nu_eff)
    mu_hat = debias(mu, bc_mu) if hp.bias_correction_mu else mu
    update = direction(mu_hat, nu_max, hp.eps, hp.eps_root)
    if decayed:
        update = decay_weights(update, param, weight_decay)
    if hp.learning_rate is not None:
        update = scale_by_step_size(update, step_size, callable(hp.learning_rate))
    return update, mu, nu, nu_max


def compute_dtype(*dtypes):
    """The dtype a leaf is computed in: its promoted dtype, at least float32."""
    return jnp.result_type(*dtypes, jnp.float32)


def _leaf_exact(grad, mu, nu, nu_max, param, scalars, hp, decayed):
    """(values in the compute dtype, optax's output dtypes) for one leaf."""

    def equations(grad, mu, nu, nu_max, param, scalars):
        return _leaf_equations(grad, mu, nu, nu_max, param, scalars, hp, decayed)

    out_types = jax.eval_shape(equations, grad, mu, nu, nu_max, param, scalars)
    dtype = compute_dtype(*(t.dtype for t in out_types))
    widened = [jnp.asarray(x, dtype) for x in (grad, mu, nu, nu_max)]
    if decayed:
        param = jnp.asarray(param, dtype)
    values = equations(*widened, param, scalars)
    return values, [t.dtype for t in out_types]


def init(
    params, mu_dtype=None, nu_dtype=None, quantization_block=QUANTIZATION_BLOCK
) -> AmsgradState:
    """count = 0; mu, nu, nu_max = 0 (mu in `mu_dtype`, nu and nu_max in
    `nu_dtype`, when given; an 8-bit one per `storage_dtype`)."""

    def zeros(p, dtype=None):
        shape = jnp.shape(p)
        dtype = storage_dtype(shape, dtype)
        if dtype is not None and jnp.dtype(dtype) in _QUANTIZED:
            code_map = MU_MAP if jnp.dtype(dtype) == jnp.int8 else NU_MAP
            codes, scales = quantize(
                jnp.zeros(shape, jnp.float32),
                code_map,
                block=quantization_block,
            )
            return QuantizedMoment(codes, scales)
        return jnp.zeros(shape, dtype or jnp.result_type(p))

    return AmsgradState(
        count=jnp.zeros([], jnp.int32),
        mu=jax.tree.map(lambda p: zeros(p, mu_dtype), params),
        nu=jax.tree.map(lambda p: zeros(p, nu_dtype), params),
        nu_max=jax.tree.map(lambda p: zeros(p, nu_dtype), params),
    )


def init_state(params, hp: Hyperparams) -> AmsgradState | FiniteGuardState:
    """`init`, inside a `FiniteGuardState` (no errors yet) when `hp` skips
    non-finite steps."""
    state = init(params, hp.mu_dtype, hp.nu_dtype, hp.quantization_block)
    if hp.max_consecutive_errors is None:
        return state
    return FiniteGuardState(
        notfinite_count=jnp.zeros([], jnp.int32),
        last_finite=jnp.array(True),
        total_notfinite=jnp.zeros([], jnp.int32),
        inner_state=state,
    )


def decay_mask(grads, hp: Hyperparams) -> list[bool]:
    """Per leaf of `grads`, whether the weight decay applies to it."""
    if not hp.decays:
        return [False] * len(jax.tree.leaves(grads))
    if hp.mask is None:
        return [True] * len(jax.tree.leaves(grads))
    mask = hp.mask(grads) if callable(hp.mask) else hp.mask
    # Each mask leaf covers its whole subtree of grads.
    spread = jax.tree.map(
        lambda m, subtree: jax.tree.map(lambda _: bool(m), subtree), mask, grads
    )
    return jax.tree.leaves(spread)


def _exact_step(grads, state, params, hp):
    """Per-leaf (values in the compute dtype, optax's dtypes) and the new count."""
    count = increment_count(state.count)
    corrections = (bias_correction(hp.b1, count), bias_correction(hp.b2, count))
    step_size = None
    if hp.learning_rate is not None:
        step_size = step_size_at(hp.learning_rate, state.count)
    norm = global_norm(grads) if hp.max_grad_norm is not None else None
    weight_decay = hp.weight_decay
    if callable(weight_decay):  # Evaluated at its own count, before the increment.
        weight_decay = weight_decay(state.count)
    scalars = (corrections, step_size, norm, weight_decay)
    treedef = jax.tree.structure(grads)
    moments = [
        [read_moment(m, hp) for m in treedef.flatten_up_to(tree)]
        for tree in (state.mu, state.nu, state.nu_max)
    ]
    decayed = decay_mask(grads, hp)
    if any(decayed) and params is None:
        raise ValueError(
            "weight decay needs the params: update(grads, state, hp, params)"
        )
    flat_params = (
        treedef.flatten_up_to(params) if params is not None else [None] * len(decayed)
    )
    leaves = [
        _leaf_exact(g, m, n, v, p, scalars, hp, d)
        for g, m, n, v, p, d in zip(
            jax.tree.leaves(grads), *moments, flat_params, decayed, strict=True
        )
    ]
    paths = [jax.tree_util.keystr(path) for path, _ in jax.tree.leaves_with_path(grads)]
    return treedef, leaves, count, paths


def store(value, dtype, hp: Hyperparams, count, path: str, array: int):
    """`value` rounded once to the `dtype` it is stored in: to nearest, or
    stochastically where `hp` asks for it and `dtype` has 16 bits. `path` is
    the leaf's key path; `array` is `rounding.PARAM`, `MU`, `NU` or `NU_MAX`.

    An 8-bit `dtype` stores a `QuantizedMoment`: `mu` and `nu` rounded to
    the nearest code (or stochastically, by the same bits a 16-bit store
    takes), `nu_max` always up, so that it never reads back below the exact
    running maximum."""
    dtype = jnp.dtype(dtype)
    if dtype in _QUANTIZED:
        if array == NU_MAX:
            rounding, bits = "up", None
        elif hp.stochastic_rounding:
            key = stream_key(hp.seed, count, leaf_id(path), array)
            rounding, bits = "stochastic", random_bits(key, jnp.shape(value))
        else:
            rounding, bits = "nearest", None
        code_map = MU_MAP if dtype == jnp.int8 else NU_MAP
        return QuantizedMoment(
            *quantize(value, code_map, rounding, bits, hp.quantization_block)
        )
    if not hp.stochastic_rounding or dtype not in _SIXTEEN_BITS:
        return value.astype(dtype)
    key = stream_key(hp.seed, count, leaf_id(path), array)
    return stochastic_round(value, dtype, random_bits(key, jnp.shape(value)))


_SIXTEEN_BITS = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _rounded_state(treedef, leaves, count, paths, hp) -> AmsgradState:
    """Round each leaf's moments once, to optax's state dtypes."""

    def rounded(index, array, dtype_override=None):
        return treedef.unflatten(
            [
                store(
                    values[index],
                    storage_dtype(jnp.shape(values[index]), dtype_override)
                    or dtypes[index],
                    hp,
                    count,
                    path,
                    array,
                )
                for (values, dtypes), path in zip(leaves, paths, strict=True)
            ]
        )

    return AmsgradState(
        count=count,
        mu=rounded(1, MU, hp.mu_dtype),
        nu=rounded(2, NU, hp.nu_dtype),
        nu_max=rounded(3, NU_MAX, hp.nu_dtype),
    )


def _guarded(grads, state, hp, run):
    """`run(inner_state, accept) -> (first, new inner_state)` behind the
    finite guard; `run` makes `first` (updates or params) what a rejected
    step gives, and the old inner state is kept, in the new state's dtypes."""
    if hp.max_consecutive_errors is None:
        return run(state, None)
    finite = all_finite(grads)
    notfinite_count = consecutive_errors(state.notfinite_count, finite)
    accept = accepts(finite, notfinite_count, hp.max_consecutive_errors)
    first, inner = run(state.inner_state, accept)
    kept = jax.tree.map(  # Over codes and scales too.
        lambda new, old: jnp.where(accept, new, jnp.asarray(old, new.dtype)),
        inner,
        state.inner_state,
    )
    return first, FiniteGuardState(
        notfinite_count=notfinite_count,
        last_finite=finite,
        total_notfinite=jnp.where(
            finite, state.total_notfinite, increment_count(state.total_notfinite)
        ),
        inner_state=kept,
    )


def update(grads, state, hp: Hyperparams, params=None):
    """One AMSGrad step: (updates, new_state), as `optax.amsgrad(...).update`
    (the composition above with options).

    With `hp.learning_rate=None` the updates are `optax.scale_by_amsgrad`'s
    (no step size, no sign flip). `params` are needed for weight decay only.
    `state` is an `AmsgradState`, or a `FiniteGuardState` when `hp` skips
    non-finite steps.
    """

    def run(inner, accept):
        treedef, leaves, count, paths = _exact_step(grads, inner, params, hp)
        updates = [values[0].astype(dtypes[0]) for values, dtypes in leaves]
        if accept is not None:
            updates = [jnp.where(accept, u, jnp.zeros_like(u)) for u in updates]
        state = _rounded_state(treedef, leaves, count, paths, hp)
        return treedef.unflatten(updates), state

    return _guarded(grads, state, hp, run)


def apply(params, updates):
    """params + updates, leaf by leaf, as `optax.apply_updates`."""
    return jax.tree.map(apply_update, params, updates)


def step(grads, state, params, hp: Hyperparams):
    """The fused step: (new_params, new_state).

    The update is added to the parameter in the compute dtype and rounded once
    to the parameter's dtype; for float32 this equals `apply(update(...))`. A
    step the finite guard rejects leaves the params exactly as they were.
    """

    def run(inner, accept):
        treedef, leaves, count, paths = _exact_step(grads, inner, params, hp)
        new_params = []
        for p, (values, _), path in zip(
            treedef.flatten_up_to(params), leaves, paths, strict=True
        ):
            new = store(p + values[0], jnp.result_type(p), hp, count, path, PARAM)
            new_params.append(new if accept is None else jnp.where(accept, new, p))
        state = _rounded_state(treedef, leaves, count, paths, hp)
        return treedef.unflatten(new_params), state

    return _guarded(grads, state, hp, run)
