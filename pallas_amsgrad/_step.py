"""The step over a pytree: checks, dtype groups, coefficients, per-shard calls.

Leaves whose input and output dtypes match form a dtype group: one set of
coefficients, one call of the implementation (one kernel launch on TPU),
run per shard on a mesh by `_sharding.per_shard`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from pallas_amsgrad import (
    _implementations,
    _math,
    _quantization,
    _rounding,
    _sharding,
    _validation,
)


class Recipe(NamedTuple):
    """One step's share of the training recipe's options, each None when off.

    Attributes:
      grad_scale: min(1, max_grad_norm / global norm), a scalar.
      weight_decay: the decay rate (a schedule already evaluated).
      decayed: per leaf of the gradients, whether it is decayed (static).
      accept: False where the finite guard skips the step, a scalar bool.
    """

    grad_scale: jax.Array | None = None
    weight_decay: jax.typing.ArrayLike | None = None
    decayed: tuple[bool, ...] | None = None
    accept: jax.Array | None = None


NO_RECIPE = Recipe()


class Hyperparams(NamedTuple):
    """The math of `scale_by_amsgrad`, as given (a Python float stays weak)."""

    b1: jax.typing.ArrayLike
    b2: jax.typing.ArrayLike
    eps: jax.typing.ArrayLike
    eps_root: jax.typing.ArrayLike
    mu_dtype: jnp.dtype | None
    bias_correction_mu: bool
    bias_correction_nu: bool
    nu_dtype: jnp.dtype | None = None  # Storage of nu and nu_max; not in optax.
    # Not in optax: 16-bit stores rounded stochastically (`_rounding`).
    stochastic_rounding: bool = False
    seed: jax.typing.ArrayLike = 0
    # Not in optax: elements per scale of 8-bit moments (`_quantization`).
    quantization_block: int = _quantization.QUANTIZATION_BLOCK


@functools.partial(jax.jit, inline=True)
def _bias_correction(decay, count):
    # Jitted with decay traced, exactly as optax's tree_bias_correction.
    return 1 - decay**count


def leaf_dtypes(
    grad, mu, nu, nu_max, hp: Hyperparams, step_size, is_schedule, decay=None
):
    """optax's dtypes for (update, mu, nu, nu_max), and the compute dtype.

    Written out from jnp's promotion of each of optax's expressions, with the
    hyperparameters as given (a Python float is weakly typed); `decay` is
    (weight_decay, param) for a decayed leaf. Clipping keeps the gradient's
    dtype. `nu_dtype`, like `mu_dtype`, sets only the stored dtypes.
    """
    mu_new = jnp.result_type(1 - hp.b1, grad, hp.b1, mu)  # (1-b1)*g + b1*mu
    # (1-b2)*|g|**2 + b2*nu, where |g|**2 is real for a complex g.
    nu_new = jnp.result_type(1 - hp.b2, jnp.finfo(grad.dtype).dtype, hp.b2, nu)
    nu_max_new = jnp.result_type(nu_max, nu_new)  # maximum(nu_max, nu/bc)
    update = jnp.result_type(mu_new, nu_max_new, hp.eps_root, hp.eps)
    if decay is not None:  # update + weight_decay * param
        update = jnp.result_type(update, jnp.result_type(*decay))
    if step_size is not None and not is_schedule:  # A schedule is cast first.
        update = jnp.result_type(step_size, update)
    mu_state = hp.mu_dtype or mu_new
    nu_state, nu_max_state = (hp.nu_dtype or nu_new), (hp.nu_dtype or nu_max_new)
    compute = jnp.result_type(update, mu_new, nu_new, nu_max_new, jnp.float32)
    return (update, mu_state, nu_state, nu_max_state), compute


def _stochastic_outputs(out_dtypes, apply_to_params: bool) -> tuple[bool, ...]:
    """Which of (first, mu, nu, nu_max) are rounded stochastically: every
    16-bit one that is stored (the new param, mu, nu, nu_max), not the update
    of `update`; and 8-bit mu and nu, not nu_max, which rounds up."""
    return tuple(
        (jnp.dtype(dtype) in _rounding.SIXTEEN_BITS and (j > 0 or apply_to_params))
        or (jnp.dtype(dtype) in _quantization.QUANTIZED_DTYPES and j in (1, 2))
        for j, dtype in enumerate(out_dtypes)
    )


def fused_update(
    grads: Any,
    state: optax.ScaleByAmsgradState,
    params: Any,
    *,
    apply_to_params: bool,
    step_size: jax.typing.ArrayLike | None,
    is_schedule: bool,
    hp: Hyperparams,
    implementation: _implementations.Implementation,
    recipe: Recipe = NO_RECIPE,
) -> tuple[Any, optax.ScaleByAmsgradState]:
    """(updates, new state), or with `apply_to_params` (new params, new state).

    Args:
      grads, state: the gradients and `optax.ScaleByAmsgradState`.
      params: the params (or None where neither applied nor decayed).
      apply_to_params: whether the outputs are the new params (`step`) rather
        than the updates.
      step_size: -learning_rate (evaluated), or None for `scale_by_amsgrad`.
      is_schedule: whether `step_size` came from a schedule (cast, not
        promoted, as optax does).
      hp: the hyperparameters.
      implementation: runs each dtype group.
      recipe: clipping, weight decay and skips for this step.
    """
    checked = {"state.mu": state.mu, "state.nu": state.nu, "state.nu_max": state.nu_max}
    if params is not None:
        checked["params"] = params
    _validation.check_trees(grads, checked)
    step_operands = _math.STEP if apply_to_params else _math.UPDATE
    arrays = jax.tree.leaves((grads, params, state))
    device = _implementations.placed_device(arrays)
    # The platform `implementation=None` chose for, or None where it was given.
    chosen_for = None
    if isinstance(implementation, _implementations.Default):
        chosen_for = _implementations.Target.of(device).platform
    implementation = _implementations.for_device(implementation, device)
    _implementations.check_platforms(implementation, arrays)

    count = optax.safe_increment(state.count)
    if recipe.accept is not None:  # A skipped step leaves the count too.
        count = jnp.where(recipe.accept, count, state.count)
    corrections = (
        _bias_correction(hp.b1, count) if hp.bias_correction_mu else 1,
        _bias_correction(hp.b2, count) if hp.bias_correction_nu else 1,
    )

    grad_paths, treedef = jax.tree_util.tree_flatten_with_path(grads)
    paths = [jax.tree_util.keystr(path) for path, _ in grad_paths]
    flat_params = [None] * treedef.num_leaves
    if params is not None:
        flat_params = treedef.flatten_up_to(params)
    decayed = recipe.decayed or (False,) * treedef.num_leaves
    groups = {}
    for index, (param, grad, mu, nu, nu_max) in enumerate(
        zip(
            flat_params,
            jax.tree.leaves(grads),
            *(treedef.flatten_up_to(t) for t in (state.mu, state.nu, state.nu_max)),
            strict=True,
        )
    ):
        moments = (mu, nu, nu_max)
        quantized = _validation.check_moments(paths[index], grad, moments, hp)
        _validation.check_complex_leaf(
            paths[index], grad, mu.codes if quantized[0] else mu, param, hp.mu_dtype
        )
        _validation.check_nu_dtype(f"grads{paths[index]}", grad.dtype, hp.nu_dtype)
        operands = step_operands.with_terms(
            _math.Terms(
                clip=recipe.grad_scale is not None,
                decay=decayed[index],
                skip=recipe.accept is not None,
            )
        )
        # A quantized moment reads as float32, and is stored in its codes'
        # dtype; a leaf too small to quantize keeps an 8-bit request in float32.
        read = [
            jax.ShapeDtypeStruct(grad.shape, jnp.float32) if q else m
            for m, q in zip(moments, quantized, strict=True)
        ]
        leaf_hp = hp._replace(
            mu_dtype=_quantization.stored_dtype(grad.shape, hp.mu_dtype),
            nu_dtype=_quantization.stored_dtype(grad.shape, hp.nu_dtype),
        )
        out_dtypes, compute = leaf_dtypes(
            grad,
            *read,
            leaf_hp,
            step_size,
            is_schedule,
            (recipe.weight_decay, param) if operands.terms.decay else None,
        )
        if apply_to_params:
            out_dtypes = (param.dtype, *out_dtypes[1:])
        if hp.stochastic_rounding:
            operands = dataclasses.replace(
                operands, stochastic=_stochastic_outputs(out_dtypes, apply_to_params)
            )
        if any(quantized):
            operands = dataclasses.replace(
                operands, quantized=quantized, block=hp.quantization_block
            )
            out_dtypes = operands.join_outputs(
                *(
                    (d, jnp.dtype(jnp.float32)) if q else d
                    for d, q in zip(out_dtypes, (False, *quantized), strict=True)
                )
            )
        stored = [
            (m.codes, m.scales) if q else m
            for m, q in zip(moments, quantized, strict=True)
        ]
        inputs = (param, grad, *operands.join_outputs(None, *stored)[1:])
        inputs = inputs[0 if operands.reads_param else 1 :]
        key = (tuple(x.dtype for x in inputs), out_dtypes, compute, operands)
        groups.setdefault(key, []).append((index, inputs))

    results = [None] * treedef.num_leaves
    for (_, out_dtypes, compute, operands), members in groups.items():
        coefficients = _math.Coefficients(
            step_size=1 if step_size is None else step_size,
            one_minus_b1=1 - hp.b1,
            b1=hp.b1,
            one_minus_b2=1 - hp.b2,
            b2=hp.b2,
            eps=hp.eps,
            eps_root=hp.eps_root,
            inverse_bias_correction_mu=1 / jnp.asarray(corrections[0], compute),
            inverse_bias_correction_nu=1 / jnp.asarray(corrections[1], compute),
            grad_scale=1 if recipe.grad_scale is None else recipe.grad_scale,
            weight_decay=0 if recipe.weight_decay is None else recipe.weight_decay,
            accept=1 if recipe.accept is None else recipe.accept,
        )
        keys = None
        if operands.rounds_stochastically:
            keys = jnp.stack(
                [
                    _rounding.stream_keys(hp.seed, count, paths[index])
                    for index, _ in members
                ]
            )
        outputs = _sharding.per_shard(
            _implementations.for_group(
                implementation, operands, compute, chosen_for=chosen_for
            ),
            coefficients.pack(compute),
            [inputs for _, inputs in members],
            paths=[paths[index] for index, _ in members],
            out_dtypes=out_dtypes,
            operands=operands,
            keys=keys,
        )
        for (index, _), leaf_outputs in zip(members, outputs, strict=True):
            results[index] = tuple(
                _quantization.QuantizedArray(*x, operands.block)
                if isinstance(x, tuple)
                else x
                for x in operands.split_outputs(leaf_outputs)
            )
    first, mu, nu, nu_max = (
        treedef.unflatten([leaf_results[i] for leaf_results in results])
        for i in range(4)
    )
    return first, optax.ScaleByAmsgradState(count=count, mu=mu, nu=nu, nu_max=nu_max)
