"""The training recipe, fused: the optax composition around the AMSGrad step.

`amsgrad` with clipping, masked decoupled weight decay or the finite guard is

    inner = chain(clip_by_global_norm(max_grad_norm),     # clips
                  scale_by_amsgrad(...),
                  add_decayed_weights(weight_decay, mask), # decays
                  scale_by_learning_rate(learning_rate))
    apply_if_finite(inner, max_consecutive_errors)         # skips

with that composition's state. Here its bookkeeping lives (the clip factor,
the guard's counters, the schedules' counts); the step size, clip factor,
decay rate and skip flag reach the kernel's one pass as runtime scalars
(`_step.Recipe`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from pallas_amsgrad import _math, _sharding, _step, _validation


@dataclasses.dataclass(frozen=True, eq=False)
class TrainingRecipe:
    """`amsgrad`'s learning rate and recipe options, as given (checked)."""

    learning_rate: optax.ScalarOrSchedule
    weight_decay: Any = None
    mask: Any = None
    max_grad_norm: Any = None
    max_consecutive_errors: Any = None

    @property
    def clips(self) -> bool:
        return self.max_grad_norm is not None

    @property
    def decays(self) -> bool:
        """None adds no decay term; any number, array or schedule does (a
        zero too, as `optax.inject_hyperparams` makes it an array)."""
        return self.weight_decay is not None

    @property
    def skips(self) -> bool:
        return self.max_consecutive_errors is not None

    @property
    def is_schedule(self) -> bool:
        return callable(self.learning_rate)

    @property
    def _amsgrad_index(self) -> int:
        """Where the AMSGrad state sits in the chain's state."""
        return 1 if self.clips else 0

    def init(self, init_amsgrad: Callable[[Any], Any], params: Any) -> Any:
        """The composition's state, with `init_amsgrad(params)` in it."""
        parts = [optax.EmptyState()] if self.clips else []
        parts.append(init_amsgrad(params))
        if self.decays:
            # Named errors before optax's own.
            _validation.decayed_leaves(self.mask, params)
            parts.append(self._decay().init(params))
        parts.append(
            optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))
            if self.is_schedule
            else optax.EmptyState()
        )
        if not self.skips:
            return tuple(parts)
        return optax.ApplyIfFiniteState(
            notfinite_count=jnp.zeros([], jnp.int32),
            last_finite=jnp.array(True, jnp.bool_),
            total_notfinite=jnp.zeros([], jnp.int32),
            inner_state=tuple(parts),
        )

    def run(self, run_amsgrad, grads, state, params, *, apply_to_params: bool):
        """(result, new state) of one step of the composition.

        `run_amsgrad(grads, amsgrad_state, params, apply_to_params=...,
        step_size=..., is_schedule=..., recipe=...)` is the fused step; the
        result is the updates, or with `apply_to_params` the new params.
        `params` may be None only where nothing decays or is applied.
        """
        inner = list(state.inner_state if self.skips else state)
        index = self._amsgrad_index
        amsgrad_state, lr_state = inner[index], inner[-1]
        recipe = {}
        if self.clips or self.skips:
            norm, finite = global_norm_and_finiteness(grads)
        if self.clips:
            max_norm = self.max_grad_norm
            recipe["grad_scale"] = jnp.where(norm < max_norm, 1.0, max_norm / norm)
        accept = None
        if self.skips:
            notfinite_count = jnp.where(
                finite,
                jnp.zeros([], jnp.int32),
                optax.safe_increment(state.notfinite_count),
            )
            accept = finite | (notfinite_count > self.max_consecutive_errors)
            recipe["accept"] = accept
        if self.decays:
            weight_decay = self.weight_decay
            if callable(weight_decay):  # At its own count, before the increment.
                weight_decay = weight_decay(_schedule_count(inner[index + 1]))
            decayed = _validation.decayed_leaves(self.mask, grads)
            recipe |= {"weight_decay": weight_decay, "decayed": decayed}
        if self.is_schedule:  # Evaluated at its own count, before the increment.
            step_size = -1 * self.learning_rate(lr_state.count)
        else:
            step_size = -1 * self.learning_rate
        result, inner[index] = run_amsgrad(
            grads,
            amsgrad_state,
            params,
            apply_to_params=apply_to_params,
            step_size=step_size,
            is_schedule=self.is_schedule,
            recipe=_step.Recipe(**recipe),
        )
        inner[index + 1 :] = [_advanced(part, accept) for part in inner[index + 1 :]]
        if not self.skips:
            return result, tuple(inner)
        return result, optax.ApplyIfFiniteState(
            notfinite_count=notfinite_count,
            last_finite=finite,
            total_notfinite=jnp.where(
                finite,
                state.total_notfinite,
                optax.safe_increment(state.total_notfinite),
            ),
            inner_state=tuple(inner),
        )

    def _decay(self) -> optax.GradientTransformation:
        return optax.add_decayed_weights(self.weight_decay, self.mask)


def global_norm_and_finiteness(grads: Any) -> tuple[jax.Array, jax.Array]:
    """(the gradients' global norm, whether every value is finite), from one
    read of the gradients.

    The norm is optax's, each leaf's sum of |g|^2 taken in at least float32;
    on a mesh, one all-reduce of the devices' partial sums.
    That sum is finite exactly when every value is, unless finite values
    overflow it: only then are the gradients read again to tell which.
    """
    leaves = jax.tree.leaves(grads)
    total = _sharding.sum_per_shard(_sum_of_squares, leaves)
    finite = jax.lax.cond(
        jnp.isfinite(total),
        lambda: jnp.array(True),
        lambda: jnp.all(jnp.array([jnp.all(jnp.isfinite(g)) for g in leaves])),
    )
    return jnp.sqrt(total), finite


def _sum_of_squares(grad: jax.Array) -> jax.Array:
    wide = jnp.asarray(grad, jnp.promote_types(grad.dtype, jnp.float32))
    return jnp.sum(_math.squared_magnitude(wide))


def _advanced(part, accept):
    """A schedule's state (possibly masked) one step on, unless skipped."""
    if isinstance(part, optax.MaskedState):
        return part._replace(inner_state=_advanced(part.inner_state, accept))
    if "count" not in getattr(part, "_fields", ()):
        return part
    count = optax.safe_increment(part.count)
    if accept is not None:
        count = jnp.where(accept, count, part.count)
    return part._replace(count=count)


def _schedule_count(part):
    """The count of a (possibly masked) schedule's state."""
    if isinstance(part, optax.MaskedState):
        return _schedule_count(part.inner_state)
    return part.count
