"""The optax face: `scale_by_amsgrad` and `amsgrad` (with `step`), and `init`.

`amsgrad` is `scale_by_amsgrad` composed with a learning rate, as optax's
alias is `chain(scale_by_amsgrad(...), scale_by_learning_rate(lr))`, but fused:
the step size reaches the same kernel pass. The step itself is
`_step.fused_update`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from pallas_amsgrad import _implementations, _sharding, _step, _validation
from pallas_amsgrad.kernels.common import BlockSizes

StepFn = Callable[[optax.Updates, optax.OptState, optax.Params], tuple[Any, Any]]
ImplementationArg = str | _implementations.Implementation | None


class GradientTransformationWithStep(optax.GradientTransformationExtraArgs):
    """An optax transformation that also offers the fused `step`.

    `step(grads, state, params) -> (new_params, new_state)` applies the update
    to the params inside the kernel's single pass, instead of `update` then
    `optax.apply_updates` (an extra read and write of params and updates).
    Jit it with `donate_argnums` for the state and params to update in place.

    It is a `GradientTransformationExtraArgs` (a pair `(init, update)`, as
    `optax.chain` and friends unpack it) whose `step` is kept through
    `_replace`, `copy` and pickling.
    """

    step: StepFn

    def __new__(cls, init, update, step):
        transformation = super().__new__(cls, init, update)
        transformation.__dict__["step"] = step
        return transformation

    def __getnewargs__(self):
        return (self.init, self.update, self.step)

    def _replace(self, **changes) -> GradientTransformationWithStep:
        fields = {"init": self.init, "update": self.update, "step": self.step}
        unknown = set(changes) - set(fields)
        if unknown:
            raise ValueError(f"Got unexpected field names: {sorted(unknown)!r}")
        return type(self)(**(fields | changes))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(init={self.init!r}, update={self.update!r}, "
            f"step={self.step!r})"
        )


def _init_state(params, mu_dtype) -> optax.ScaleByAmsgradState:
    """optax's state, each moment sharded as its param.

    Works on arrays, on tracers (under `jit`, whose `out_shardings` then
    decide) and on `jax.ShapeDtypeStruct`s, whose `sharding` is honoured: each
    device creates only its own shards, nothing is materialised whole.
    """
    meshes = []

    def zeros(path, p, dtype=None):
        if dtype is not None and jnp.issubdtype(p.dtype, jnp.complexfloating):
            raise TypeError(
                f"params{jax.tree_util.keystr(path)} is complex ({p.dtype}) but "
                f"mu_dtype={jnp.dtype(dtype).name} is real: casting mu to it "
                "would drop its imaginary part; use mu_dtype=None for complex "
                "leaves"
            )
        dtype = dtype or p.dtype
        if isinstance(p, jax.Array):  # Keeps a concrete or explicit sharding.
            if isinstance(getattr(p, "sharding", None), NamedSharding):
                meshes.append(p.sharding.mesh)
            return jnp.zeros_like(p, dtype)
        # A ShapeDtypeStruct's PartitionSpec comes back resolved on the
        # context mesh, as a NamedSharding.
        sharding = getattr(p, "sharding", None)
        if sharding is not None:
            _sharding.check_splits(
                f"params{jax.tree_util.keystr(path)}", p.shape, sharding
            )
            if isinstance(sharding, NamedSharding):
                meshes.append(sharding.mesh)
        return jnp.zeros(jnp.shape(p), dtype, device=sharding)

    mu = jax.tree_util.tree_map_with_path(lambda k, p: zeros(k, p, mu_dtype), params)
    nu = jax.tree_util.tree_map_with_path(zeros, params)
    nu_max = jax.tree_util.tree_map_with_path(zeros, params)
    # The count goes where the params are: replicated on their mesh.
    count_sharding = NamedSharding(meshes[0], PartitionSpec()) if meshes else None
    return optax.ScaleByAmsgradState(
        count=jnp.zeros([], jnp.int32, device=count_sharding),
        mu=mu,
        nu=nu,
        nu_max=nu_max,
    )


@dataclasses.dataclass(frozen=True, eq=False)
class _ScaleByAmsgradUpdate:
    """`scale_by_amsgrad`'s update function, and the fused step beneath it,
    which `amsgrad` runs with a step size (and params, for `step`)."""

    hp: _step.Hyperparams
    implementation: _implementations.Implementation

    def __call__(self, updates, state, params=None, **extra_args):
        del params, extra_args  # The update does not depend on them.
        return self.run(updates, state, None)

    def run(self, grads, state, params, step_size=None, is_schedule=False):
        return _step.fused_update(
            grads,
            state,
            params,
            step_size=step_size,
            is_schedule=is_schedule,
            hp=self.hp,
            implementation=self.implementation,
        )


def _with_learning_rate(
    learning_rate: optax.ScalarOrSchedule,
    scale: optax.GradientTransformationExtraArgs,
) -> GradientTransformationWithStep:
    """`chain(scale, scale_by_learning_rate(learning_rate))`, fused: the state
    is the chain's, and the step size reaches the kernel as a runtime scalar."""
    is_schedule = callable(learning_rate)
    run = scale.update.run

    def init_fn(params):
        lr_state = (
            optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))
            if is_schedule
            else optax.EmptyState()
        )
        return (scale.init(params), lr_state)

    def fused(grads, state, params):
        amsgrad_state, lr_state = state
        if is_schedule:  # Evaluated at its own count, before the increment.
            step_size = -1 * learning_rate(lr_state.count)
            lr_state = optax.ScaleByScheduleState(
                count=optax.safe_increment(lr_state.count)
            )
        else:
            step_size = -1 * learning_rate
        result, amsgrad_state = run(
            grads, amsgrad_state, params, step_size, is_schedule
        )
        return result, (amsgrad_state, lr_state)

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args  # The update does not depend on them.
        return fused(updates, state, None)

    def step_fn(grads, state, params):
        if params is None:
            raise TypeError(
                "step(grads, state, params) applies the update to params, but "
                "params=None; pass the params, or call update(grads, state) "
                "for the updates alone"
            )
        return fused(grads, state, params)

    return GradientTransformationWithStep(init_fn, update_fn, step_fn)


def scale_by_amsgrad(
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    eps_root: jax.typing.ArrayLike = 0.0,
    mu_dtype: Any | None = None,
    bias_correction_mu: bool = True,
    bias_correction_nu: bool = True,
    *,
    implementation: ImplementationArg = None,
    block_sizes: BlockSizes | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Rescale updates by AMSGrad, fused: `optax.scale_by_amsgrad`'s drop-in.

    Args:
      b1, b2, eps, eps_root, mu_dtype, bias_correction_mu, bias_correction_nu:
        as in `optax.scale_by_amsgrad`.
      implementation: "pallas" (the fused kernel; interpreted on CPU), "xla"
        (the same math as XLA fusions), an implementation object
        (`pallas_amsgrad.Pallas(...)`, `pallas_amsgrad.Xla()`), or None:
        pallas on TPU/GPU, xla on CPU.
      block_sizes: overrides the kernel's per-platform default block sizes.

    Returns:
      An `optax.GradientTransformationExtraArgs` whose state is
      `optax.ScaleByAmsgradState`.
    """
    for name, value in (("b1", b1), ("b2", b2), ("eps", eps), ("eps_root", eps_root)):
        _validation.check_scalar(name, value)
    hp = _step.Hyperparams(
        b1,
        b2,
        eps,
        eps_root,
        _validation.canonical_mu_dtype(mu_dtype),
        bool(bias_correction_mu),
        bool(bias_correction_nu),
    )
    update = _ScaleByAmsgradUpdate(
        hp, _implementations.resolve(implementation, block_sizes)
    )
    return optax.GradientTransformationExtraArgs(
        lambda params: _init_state(params, hp.mu_dtype), update
    )


def amsgrad(
    learning_rate: optax.ScalarOrSchedule,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    eps_root: jax.typing.ArrayLike = 0.0,
    mu_dtype: Any | None = None,
    bias_correction_mu: bool = True,
    bias_correction_nu: bool = True,
    *,
    implementation: ImplementationArg = None,
    block_sizes: BlockSizes | None = None,
) -> GradientTransformationWithStep:
    """The AMSGrad optimizer, fused: a drop-in for `optax.amsgrad`.

    `init` returns optax's state exactly (`(ScaleByAmsgradState, EmptyState())`,
    or `ScaleByScheduleState` for a schedule), so checkpoints move both ways.

    Args:
      learning_rate: a scalar or a schedule of the step count.
      b1, b2, eps, eps_root, mu_dtype, bias_correction_mu, bias_correction_nu:
        as in `optax.amsgrad`.
      implementation: "pallas", "xla", an implementation object or None (see
        `scale_by_amsgrad`).
      block_sizes: overrides the kernel's per-platform default block sizes.

    Returns:
      A `GradientTransformationWithStep`: optax's `init`/`update`, plus `step`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import pallas_amsgrad
      >>> opt = pallas_amsgrad.amsgrad(learning_rate=0.003)
      >>> params = jnp.array([1.0, 2.0, 3.0])
      >>> state = opt.init(params)
      >>> params, state = opt.step(2 * params, state, params)
      >>> print(params)
      [0.99700004 1.997      2.997     ]
    """
    _validation.check_learning_rate(learning_rate)
    scale = scale_by_amsgrad(
        b1,
        b2,
        eps,
        eps_root,
        mu_dtype,
        bias_correction_mu,
        bias_correction_nu,
        implementation=implementation,
        block_sizes=block_sizes,
    )
    return _with_learning_rate(learning_rate, scale)
