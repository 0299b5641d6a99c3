"""The optax face: `scale_by_amsgrad` and `amsgrad` (with `step`), and `init`.

`amsgrad` is `scale_by_amsgrad` composed with a learning rate, as optax's
alias is `chain(scale_by_amsgrad(...), scale_by_learning_rate(lr))`, but fused:
the step size reaches the same kernel pass. The recipe's composition around
it is `_recipe`; the step itself is `_step.fused_update`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from pallas_amsgrad import (
    _implementations,
    _quantization,
    _recipe,
    _sharding,
    _step,
    _validation,
)
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


def _init_state(
    params, mu_dtype, nu_dtype=None, block=_quantization.QUANTIZATION_BLOCK
) -> optax.ScaleByAmsgradState:
    """optax's state, each moment sharded as its param (mu in `mu_dtype`, nu
    and nu_max in `nu_dtype`, where given; an 8-bit one as a
    `QuantizedArray` of `block`s where the leaf quantizes, else float32).

    Works on arrays, on tracers (under `jit`, whose `out_shardings` then
    decide) and on `jax.ShapeDtypeStruct`s, whose `sharding` is honoured: each
    device creates only its own shards, nothing is materialised whole.
    """
    meshes = []

    def zeros(path, p, dtype=None):
        name = f"params{jax.tree_util.keystr(path)}"
        if dtype is not None and jnp.issubdtype(p.dtype, jnp.complexfloating):
            raise TypeError(
                f"{name} is complex ({p.dtype}) but "
                f"mu_dtype={jnp.dtype(dtype).name} is real: casting mu to it "
                "would drop its imaginary part; use mu_dtype=None for complex "
                "leaves"
            )
        dtype = _quantization.stored_dtype(jnp.shape(p), dtype)
        if dtype is not None and jnp.dtype(dtype) in _quantization.QUANTIZED_DTYPES:
            return _quantized_zeros(name, p, dtype, block, meshes)
        dtype = dtype or p.dtype
        if isinstance(p, jax.Array):  # Keeps a concrete or explicit sharding.
            if isinstance(getattr(p, "sharding", None), NamedSharding):
                meshes.append(p.sharding.mesh)
            return jnp.zeros_like(p, dtype)
        # A ShapeDtypeStruct's PartitionSpec comes back resolved on the
        # context mesh, as a NamedSharding.
        sharding = getattr(p, "sharding", None)
        if sharding is not None:
            _sharding.check_splits(name, p.shape, sharding)
            if isinstance(sharding, NamedSharding):
                meshes.append(sharding.mesh)
        return jnp.zeros(jnp.shape(p), dtype, device=sharding)

    def nu_zeros(path, p):
        name = f"params{jax.tree_util.keystr(path)}"
        _validation.check_nu_dtype(name, p.dtype, nu_dtype)
        return zeros(path, p, nu_dtype)

    mu = jax.tree_util.tree_map_with_path(lambda k, p: zeros(k, p, mu_dtype), params)
    nu = jax.tree_util.tree_map_with_path(nu_zeros, params)
    nu_max = jax.tree_util.tree_map_with_path(nu_zeros, params)
    # The count goes where the params are: replicated on their mesh.
    count_sharding = NamedSharding(meshes[0], PartitionSpec()) if meshes else None
    return optax.ScaleByAmsgradState(
        count=jnp.zeros([], jnp.int32, device=count_sharding),
        mu=mu,
        nu=nu,
        nu_max=nu_max,
    )


def _quantized_zeros(name, p, dtype, block, meshes) -> _quantization.QuantizedArray:
    """Zero codes and zero scales for a param (array, tracer or
    ShapeDtypeStruct), both sharded as it is."""
    if jnp.dtype(p.dtype) not in _QUANTIZABLE:
        raise TypeError(
            f"{name} is {jnp.dtype(p.dtype).name}: 8-bit state is computed in "
            "float32, for float32, bfloat16 and float16 leaves"
        )
    shape = tuple(jnp.shape(p))
    sharding = None
    if not isinstance(p, jax.core.Tracer):
        sharding = getattr(p, "sharding", None)
    if isinstance(sharding, NamedSharding):
        _sharding.check_splits(name, shape, sharding)
        _sharding.check_blocks(name, shape, sharding, block)
        meshes.append(sharding.mesh)
    scales = _quantization.scale_shape(shape, block)
    return _quantization.QuantizedArray(
        jnp.zeros(shape, dtype, device=sharding),
        jnp.zeros(scales, jnp.float32, device=sharding),
        block,
    )


_QUANTIZABLE = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@dataclasses.dataclass(frozen=True, eq=False)
class _ScaleByAmsgradUpdate:
    """`scale_by_amsgrad`'s update function, and the fused step beneath it,
    which `amsgrad` runs with a step size (and params, for `step`)."""

    hp: _step.Hyperparams
    implementation: _implementations.Implementation

    def __call__(self, updates, state, params=None, **extra_args):
        del params, extra_args  # The update does not depend on them.
        return self.run(updates, state, None, apply_to_params=False)

    def run(
        self,
        grads,
        state,
        params,
        *,
        apply_to_params,
        step_size=None,
        is_schedule=False,
        recipe=_step.NO_RECIPE,
    ):
        return _step.fused_update(
            grads,
            state,
            params,
            apply_to_params=apply_to_params,
            step_size=step_size,
            is_schedule=is_schedule,
            hp=self.hp,
            implementation=self.implementation,
            recipe=recipe,
        )


def _training_step(
    recipe: _recipe.TrainingRecipe, scale: optax.GradientTransformationExtraArgs
) -> GradientTransformationWithStep:
    """`recipe` around `scale`, fused into the one pass of its kernel."""
    run = scale.update.run

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args  # The update does not depend on them.
        if not recipe.decays:
            params = None
        elif params is None:
            raise ValueError(
                "amsgrad(weight_decay=...) decays the params, but params=None: "
                "call update(grads, state, params)"
            )
        return recipe.run(run, updates, state, params, apply_to_params=False)

    def step_fn(grads, state, params):
        if params is None:
            raise TypeError(
                "step(grads, state, params) applies the update to params, but "
                "params=None; pass the params, or call update(grads, state) "
                "for the updates alone"
            )
        return recipe.run(run, grads, state, params, apply_to_params=True)

    return GradientTransformationWithStep(
        functools.partial(recipe.init, scale.init), update_fn, step_fn
    )


def scale_by_amsgrad(
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    eps_root: jax.typing.ArrayLike = 0.0,
    mu_dtype: Any | None = None,
    bias_correction_mu: bool = True,
    bias_correction_nu: bool = True,
    *,
    nu_dtype: Any | None = None,
    stochastic_rounding: bool = False,
    seed: jax.typing.ArrayLike | None = None,
    quantization_block: int | None = None,
    implementation: ImplementationArg = None,
    block_sizes: BlockSizes | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Rescale updates by AMSGrad, fused: `optax.scale_by_amsgrad`'s drop-in.

    Args:
      b1, b2, eps, eps_root, mu_dtype, bias_correction_mu, bias_correction_nu:
        as in `optax.scale_by_amsgrad`; `mu_dtype=jnp.int8` stores `mu`
        block-quantized (see `nu_dtype`).
      nu_dtype: the dtype `nu` and `nu_max` are stored in (None: as optax,
        the gradients'); a real floating dtype no wider than the computation.
        The step computes in at least float32 and rounds them to it once.
        `jnp.uint8` (and `mu_dtype=jnp.int8`) stores them block-quantized:
        each as a `pallas_amsgrad.QuantizedArray` of 8-bit codes and a
        float32 scale per `quantization_block` elements along the last
        dimension, where the leaf has at least 4096 elements (smaller
        leaves keep float32). `nu_max` is rounded up, so it never reads
        back below the exact running maximum (docs/quantized-state.md).
      stochastic_rounding: round every value stored in 16 bits (mu, nu,
        nu_max; and the params in `step`) stochastically: to a neighbour at
        random, unbiased, so that small changes survive on average; 8-bit
        `mu` and `nu` too (not `nu_max`, always rounded up). Float32
        storage, and the updates `update` returns, round to nearest as ever.
      seed: an integer (taken modulo 2**32; None: 0) that with the step
        count, each leaf's key path and each element's index determines the
        random bits: a step is reproducible, and its bits do not depend on
        the implementation, the block sizes or the sharding. None, not 0, is
        the default so that `optax.inject_hyperparams` leaves it alone.
      quantization_block: elements per scale of 8-bit state, a positive
        multiple of 128 (None: 256); a Python int.
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
    _validation.check_stochastic_rounding(stochastic_rounding, seed)
    mu_dtype = _validation.canonical_state_dtype("mu_dtype", mu_dtype)
    nu_dtype = _validation.canonical_state_dtype("nu_dtype", nu_dtype)
    hp = _step.Hyperparams(
        b1,
        b2,
        eps,
        eps_root,
        mu_dtype,
        bool(bias_correction_mu),
        bool(bias_correction_nu),
        nu_dtype,
        bool(stochastic_rounding),
        0 if seed is None else seed,
        _validation.check_quantization_block(quantization_block, mu_dtype, nu_dtype),
    )
    update = _ScaleByAmsgradUpdate(
        hp, _implementations.resolve(implementation, block_sizes)
    )
    return optax.GradientTransformationExtraArgs(
        lambda params: _init_state(
            params, hp.mu_dtype, hp.nu_dtype, hp.quantization_block
        ),
        update,
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
    nu_dtype: Any | None = None,
    stochastic_rounding: bool = False,
    seed: jax.typing.ArrayLike | None = None,
    weight_decay: optax.ScalarOrSchedule | None = None,
    mask: Any = None,
    max_grad_norm: jax.typing.ArrayLike | None = None,
    max_consecutive_errors: int | None = None,
    quantization_block: int | None = None,
    implementation: ImplementationArg = None,
    block_sizes: BlockSizes | None = None,
) -> GradientTransformationWithStep:
    """The AMSGrad optimizer, fused: a drop-in for `optax.amsgrad`.

    `init` returns optax's state exactly (`(ScaleByAmsgradState, EmptyState())`,
    or `ScaleByScheduleState` for a schedule), so checkpoints move both ways.

    The training recipe's options (off by default) fold clipping, decoupled
    weight decay and non-finite skips into the same pass. With any of them,
    the optimizer is exactly this optax composition, and has its state:

        inner = optax.chain(
            optax.clip_by_global_norm(max_grad_norm),        # if not None
            optax.scale_by_amsgrad(b1, b2, eps, eps_root, mu_dtype, ...),
            optax.add_decayed_weights(weight_decay, mask),   # if not None
            optax.scale_by_learning_rate(learning_rate),
        )
        optax.apply_if_finite(inner, max_consecutive_errors)  # if not None

    except that it computes in at least float32 and rounds once, and that a
    skipped step returns zero updates of the update's dtype (optax's
    `apply_if_finite` fails where that differs from the gradients' dtype).

    Args:
      learning_rate: a scalar or a schedule of the step count.
      b1, b2, eps, eps_root, mu_dtype, bias_correction_mu, bias_correction_nu:
        as in `optax.amsgrad`.
      nu_dtype: the dtype `nu` and `nu_max` are stored in (see
        `scale_by_amsgrad`); e.g. `jnp.bfloat16` halves their memory and
        traffic. The state keeps optax's structure, with narrower leaves.
        `mu_dtype=jnp.int8, nu_dtype=jnp.uint8` quarters it: 8-bit
        block-quantized moments (see `scale_by_amsgrad`).
      stochastic_rounding, seed: 16-bit stores rounded stochastically (see
        `scale_by_amsgrad`): the params in `step` too, which lets bfloat16
        params train without float32 master weights.
      weight_decay: decoupled weight decay (AdamW's): the update becomes
        `-lr * (direction + weight_decay * param)`; a non-negative scalar or a
        schedule. `update` then needs the params. None (the default) adds no
        term, and `optax.inject_hyperparams` leaves it alone, so its state is
        then exactly that of `optax.amsgrad`; any number, 0.0 too, adds it.
      mask: which leaves are decayed: a pytree of bools (a prefix of the
        params'), or a callable of the gradients returning one; None: all.
      max_grad_norm: gradients are scaled by min(1, max_grad_norm / global
        norm) before the moments; a positive scalar.
      max_consecutive_errors: when an int (at least 1), a step whose
        gradients hold a NaN or inf changes nothing (zero updates, params and
        moments kept), until more than this many such steps come in a row.
      quantization_block: elements per scale of 8-bit state (see
        `scale_by_amsgrad`).
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
    _validation.check_weight_decay(weight_decay)
    _validation.check_mask(mask)
    if max_grad_norm is not None:
        _validation.check_non_negative("max_grad_norm", max_grad_norm, allow_zero=False)
    _validation.check_max_consecutive_errors(max_consecutive_errors)
    recipe = _recipe.TrainingRecipe(
        learning_rate, weight_decay, mask, max_grad_norm, max_consecutive_errors
    )
    scale = scale_by_amsgrad(
        b1,
        b2,
        eps,
        eps_root,
        mu_dtype,
        bias_correction_mu,
        bias_correction_nu,
        nu_dtype=nu_dtype,
        stochastic_rounding=stochastic_rounding,
        seed=seed,
        quantization_block=quantization_block,
        implementation=implementation,
        block_sizes=block_sizes,
    )
    return _training_step(recipe, scale)
