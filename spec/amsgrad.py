"""AMSGrad as an executable math spec: the oracle for the fused kernel.

Mirrors `optax.amsgrad` of optax 0.2.8 (Reddi et al., "On the Convergence of
Adam and Beyond"). One small function per equation; `update`, `apply` and
`step` compose them over a pytree. Plain `jax.numpy` only.

Precision rule
--------------
* Output dtypes are optax's, exactly. They are obtained by evaluating the same
  equations abstractly (`jax.eval_shape`) on the leaves' own dtypes, so the
  spec inherits optax's promotion rules rather than restating them: e.g. a
  bfloat16 leaf with `mu_dtype=float32` gets a float32 update.
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

Schedule = Callable[[jax.Array], jax.typing.ArrayLike]


class AmsgradState(NamedTuple):
    """The state of AMSGrad, field for field `optax.ScaleByAmsgradState`."""

    count: jax.Array  # int32 steps taken so far; saturates at the int32 max.
    mu: Any  # First moment, in `mu_dtype` (or the promoted dtype if None).
    nu: Any  # Second moment, in the parameter dtype.
    nu_max: Any  # Running elementwise maximum of the (debiased) second moment.


@dataclasses.dataclass(frozen=True)
class Hyperparams:
    """The eight hyperparameters of `optax.amsgrad`, with its defaults."""

    learning_rate: jax.typing.ArrayLike | Schedule
    b1: jax.typing.ArrayLike = 0.9
    b2: jax.typing.ArrayLike = 0.999
    eps: jax.typing.ArrayLike = 1e-8
    eps_root: jax.typing.ArrayLike = 0.0
    mu_dtype: Any = None
    bias_correction_mu: bool = True
    bias_correction_nu: bool = True


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


def apply_update(param, update):
    """p_t = p_{t-1} + u_t, returned in the parameter's dtype."""
    return jnp.asarray(param + update).astype(jnp.asarray(param).dtype)


# --- Composition over one leaf, then over pytrees. ---------------------------


def _leaf_equations(grad, mu, nu, nu_max, corrections, step_size, hp):
    """All equations for one leaf, in whatever dtypes the inputs carry."""
    bc_mu, bc_nu = corrections
    mu = first_moment(grad, mu, hp.b1)
    nu = second_moment(grad, nu, hp.b2)
    nu_eff = debias(nu, bc_nu) if hp.bias_correction_nu else nu
    nu_max = running_max(nu_max, nu_eff)
    mu_hat = debias(mu, bc_mu) if hp.bias_correction_mu else mu
    update = direction(mu_hat, nu_max, hp.eps, hp.eps_root)
    if hp.learning_rate is not None:
        update = scale_by_step_size(update, step_size, callable(hp.learning_rate))
    return update, mu, nu, nu_max


def compute_dtype(*dtypes):
    """The dtype a leaf is computed in: its promoted dtype, at least float32."""
    return jnp.result_type(*dtypes, jnp.float32)


def _leaf_exact(grad, mu, nu, nu_max, corrections, step_size, hp):
    """(values in the compute dtype, optax's output dtypes) for one leaf."""

    def equations(grad, mu, nu, nu_max, corrections, step_size):
        return _leaf_equations(grad, mu, nu, nu_max, corrections, step_size, hp)

    out_types = jax.eval_shape(equations, grad, mu, nu, nu_max, corrections, step_size)
    dtype = compute_dtype(*(t.dtype for t in out_types))
    widened = [jnp.asarray(x, dtype) for x in (grad, mu, nu, nu_max)]
    values = equations(*widened, corrections, step_size)
    return values, [t.dtype for t in out_types]


def init(params, mu_dtype=None) -> AmsgradState:
    """count = 0; mu, nu, nu_max = 0 (mu in `mu_dtype` when given)."""

    def zeros(p, dtype=None):
        return jnp.zeros(jnp.shape(p), dtype or jnp.result_type(p))

    return AmsgradState(
        count=jnp.zeros([], jnp.int32),
        mu=jax.tree.map(lambda p: zeros(p, mu_dtype), params),
        nu=jax.tree.map(zeros, params),
        nu_max=jax.tree.map(zeros, params),
    )


def _exact_step(grads, state, hp):
    """Per-leaf (values in the compute dtype, optax's dtypes) and the new count."""
    count = increment_count(state.count)
    corrections = (bias_correction(hp.b1, count), bias_correction(hp.b2, count))
    step_size = None
    if hp.learning_rate is not None:
        step_size = step_size_at(hp.learning_rate, state.count)
    treedef = jax.tree.structure(grads)
    moments = [
        treedef.flatten_up_to(tree) for tree in (state.mu, state.nu, state.nu_max)
    ]
    leaves = [
        _leaf_exact(g, m, n, v, corrections, step_size, hp)
        for g, m, n, v in zip(jax.tree.leaves(grads), *moments, strict=True)
    ]
    return treedef, leaves, count


def _rounded_state(treedef, leaves, count, hp) -> AmsgradState:
    """Round each leaf's moments once, to optax's state dtypes."""

    def rounded(index, dtype_override=None):
        return treedef.unflatten(
            [
                values[index].astype(dtype_override or dtypes[index])
                for values, dtypes in leaves
            ]
        )

    return AmsgradState(
        count=count,
        mu=rounded(1, hp.mu_dtype),
        nu=rounded(2),
        nu_max=rounded(3),
    )


def update(grads, state: AmsgradState, hp: Hyperparams):
    """One AMSGrad step: (updates, new_state), as `optax.amsgrad(...).update`.

    With `hp.learning_rate=None` the updates are `optax.scale_by_amsgrad`'s
    (no step size, no sign flip).
    """
    treedef, leaves, count = _exact_step(grads, state, hp)
    updates = treedef.unflatten(
        [values[0].astype(dtypes[0]) for values, dtypes in leaves]
    )
    return updates, _rounded_state(treedef, leaves, count, hp)


def apply(params, updates):
    """params + updates, leaf by leaf, as `optax.apply_updates`."""
    return jax.tree.map(apply_update, params, updates)


def step(grads, state: AmsgradState, params, hp: Hyperparams):
    """The fused step: (new_params, new_state).

    The update is added to the parameter in the compute dtype and rounded once
    to the parameter's dtype; for float32 this equals `apply(update(...))`.
    """
    treedef, leaves, count = _exact_step(grads, state, hp)
    new_params = [
        apply_update(p, values[0])
        for p, (values, _) in zip(treedef.flatten_up_to(params), leaves, strict=True)
    ]
    return treedef.unflatten(new_params), _rounded_state(treedef, leaves, count, hp)
