"""The optax-compatible API: `scale_by_amsgrad` and `amsgrad` (with `step`)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from pallas_amsgrad import _kernel, _math, _sharding, _validation

StepFn = Callable[[optax.Updates, optax.OptState, optax.Params], tuple[Any, Any]]


class GradientTransformationWithStep(optax.GradientTransformationExtraArgs):
    """An optax transformation that also offers the fused `step`.

    `step(grads, state, params) -> (new_params, new_state)` applies the update
    to the params inside the kernel's single pass, instead of `update` then
    `optax.apply_updates` (an extra read and write of params and updates).
    Jit it with `donate_argnums` for the state and params to update in place.
    """

    step: StepFn

    def __new__(cls, init, update, step):
        transformation = super().__new__(cls, init, update)
        transformation.step = step
        return transformation


class _Hyperparams(NamedTuple):
    b1: jax.typing.ArrayLike
    b2: jax.typing.ArrayLike
    eps: jax.typing.ArrayLike
    eps_root: jax.typing.ArrayLike
    mu_dtype: jnp.dtype | None
    bias_correction_mu: bool
    bias_correction_nu: bool
    implementation: str | None
    block_sizes: _kernel.BlockSizes | None


@functools.partial(jax.jit, inline=True)
def _bias_correction(decay, count):
    # Jitted with decay traced, exactly as optax's tree_bias_correction.
    return 1 - decay**count


def _leaf_dtypes(grad, mu, nu, nu_max, hp: _Hyperparams, step_size, is_schedule):
    """optax's dtypes for (update, mu, nu, nu_max), and the compute dtype.

    Written out from jnp's promotion of each of optax's expressions, with the
    hyperparameters as given (a Python float is weakly typed).
    """
    mu_new = jnp.result_type(1 - hp.b1, grad, hp.b1, mu)  # (1-b1)*g + b1*mu
    nu_new = jnp.result_type(1 - hp.b2, grad, hp.b2, nu)  # (1-b2)*g**2 + b2*nu
    nu_max_new = jnp.result_type(nu_max, nu_new)  # maximum(nu_max, nu/bc)
    update = jnp.result_type(mu_new, nu_max_new, hp.eps_root, hp.eps)
    if step_size is not None and not is_schedule:  # A schedule is cast first.
        update = jnp.result_type(step_size, update)
    mu_state = hp.mu_dtype or mu_new
    compute = jnp.result_type(update, mu_new, nu_new, nu_max_new, jnp.float32)
    return (update, mu_state, nu_new, nu_max_new), compute


def _fused_update(grads, state, params, step_size, is_schedule, hp: _Hyperparams):
    """(updates or new params, new ScaleByAmsgradState) for a whole pytree."""
    checked = {"state.mu": state.mu, "state.nu": state.nu, "state.nu_max": state.nu_max}
    if params is not None:
        checked["params"] = params
    _validation.check_trees(grads, checked)

    count = optax.safe_increment(state.count)
    corrections = (
        _bias_correction(hp.b1, count) if hp.bias_correction_mu else 1,
        _bias_correction(hp.b2, count) if hp.bias_correction_nu else 1,
    )
    implementation = hp.implementation
    if implementation is None:
        implementation = "xla" if jax.default_backend() == "cpu" else "pallas"

    grad_paths, treedef = jax.tree_util.tree_flatten_with_path(grads)
    paths = [jax.tree_util.keystr(path) for path, _ in grad_paths]
    flat_params = [None] * treedef.num_leaves
    if params is not None:
        flat_params = treedef.flatten_up_to(params)
    # Leaves with the same dtypes share coefficients and one kernel launch.
    groups = {}
    for index, (grad, mu, nu, nu_max, param) in enumerate(
        zip(
            jax.tree.leaves(grads),
            *(treedef.flatten_up_to(t) for t in (state.mu, state.nu, state.nu_max)),
            flat_params,
            strict=True,
        )
    ):
        out_dtypes, compute = _leaf_dtypes(
            grad, mu, nu, nu_max, hp, step_size, is_schedule
        )
        inputs = (grad, mu, nu, nu_max)
        if param is not None:
            out_dtypes = (param.dtype, *out_dtypes[1:])
            compute = jnp.result_type(compute, param.dtype)
            inputs = (param, *inputs)
        key = (tuple(x.dtype for x in inputs), out_dtypes, compute)
        groups.setdefault(key, []).append((index, inputs))

    results = [None] * treedef.num_leaves
    for (_, out_dtypes, compute), members in groups.items():
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
        )
        coefficients = jnp.stack([jnp.asarray(c).astype(compute) for c in coefficients])
        group = _kernel.amsgrad_group if implementation == "pallas" else _xla_group
        outputs = _sharding.per_shard(
            group,
            coefficients,
            [inputs for _, inputs in members],
            paths=[paths[index] for index, _ in members],
            out_dtypes=out_dtypes,
            apply_to_params=params is not None,
            block_sizes=hp.block_sizes,
        )
        for (index, _), leaf_outputs in zip(members, outputs, strict=True):
            results[index] = leaf_outputs
    first, mu, nu, nu_max = (
        treedef.unflatten([leaf_results[i] for leaf_results in results])
        for i in range(4)
    )
    return first, optax.ScaleByAmsgradState(count=count, mu=mu, nu=nu, nu_max=nu_max)


def _xla_group(coefficients, leaves, *, out_dtypes, apply_to_params, block_sizes):
    """The same block math on whole arrays; XLA fuses each leaf into loops."""
    del block_sizes
    dtype = coefficients.dtype
    results = []
    for leaf in leaves:
        param, (grad, mu, nu, nu_max) = (
            (leaf[0], leaf[1:]) if apply_to_params else (None, leaf)
        )
        update, *moments = _math.amsgrad_block(
            *(x.astype(dtype) for x in (grad, mu, nu, nu_max)), list(coefficients)
        )
        if param is not None:
            update = param.astype(dtype) + update
        results.append(
            tuple(
                x.astype(d) for x, d in zip((update, *moments), out_dtypes, strict=True)
            )
        )
    return results


def _init_state(params, mu_dtype) -> optax.ScaleByAmsgradState:
    """optax's state, each moment sharded as its param.

    Works on arrays, on tracers (under `jit`, whose `out_shardings` then
    decide) and on `jax.ShapeDtypeStruct`s, whose `sharding` is honoured: each
    device creates only its own shards, nothing is materialised whole.
    """
    meshes = []

    def zeros(path, p, dtype=None):
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


def _hyperparams(
    b1,
    b2,
    eps,
    eps_root,
    mu_dtype,
    bias_correction_mu,
    bias_correction_nu,
    implementation,
    block_sizes,
) -> _Hyperparams:
    for name, value in (("b1", b1), ("b2", b2), ("eps", eps), ("eps_root", eps_root)):
        _validation.check_scalar(name, value)
    _validation.check_implementation(implementation)
    if block_sizes is not None and not isinstance(block_sizes, _kernel.BlockSizes):
        raise TypeError(f"block_sizes={block_sizes!r} must be a BlockSizes or None")
    return _Hyperparams(
        b1,
        b2,
        eps,
        eps_root,
        _validation.canonical_mu_dtype(mu_dtype),
        bool(bias_correction_mu),
        bool(bias_correction_nu),
        implementation,
        block_sizes,
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
    implementation: str | None = None,
    block_sizes: _kernel.BlockSizes | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Rescale updates by AMSGrad, fused: `optax.scale_by_amsgrad`'s drop-in.

    Args:
      b1, b2, eps, eps_root, mu_dtype, bias_correction_mu, bias_correction_nu:
        as in `optax.scale_by_amsgrad`.
      implementation: "pallas" (the fused kernel; interpreted on CPU), "xla"
        (the same math as one XLA fusion), or None: pallas on TPU/GPU, xla on
        CPU.
      block_sizes: overrides the kernel's per-platform default block sizes.

    Returns:
      An `optax.GradientTransformationExtraArgs` whose state is
      `optax.ScaleByAmsgradState`.
    """
    hp = _hyperparams(
        b1,
        b2,
        eps,
        eps_root,
        mu_dtype,
        bias_correction_mu,
        bias_correction_nu,
        implementation,
        block_sizes,
    )

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        return _fused_update(updates, state, None, None, False, hp)

    return optax.GradientTransformationExtraArgs(
        lambda params: _init_state(params, hp.mu_dtype), update_fn
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
    implementation: str | None = None,
    block_sizes: _kernel.BlockSizes | None = None,
) -> GradientTransformationWithStep:
    """The AMSGrad optimizer, fused: a drop-in for `optax.amsgrad`.

    `init` returns optax's state exactly (`(ScaleByAmsgradState, EmptyState())`,
    or `ScaleByScheduleState` for a schedule), so checkpoints move both ways.

    Args:
      learning_rate: a scalar or a schedule of the step count.
      b1, b2, eps, eps_root, mu_dtype, bias_correction_mu, bias_correction_nu:
        as in `optax.amsgrad`.
      implementation: "pallas", "xla" or None (see `scale_by_amsgrad`).
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
    hp = _hyperparams(
        b1,
        b2,
        eps,
        eps_root,
        mu_dtype,
        bias_correction_mu,
        bias_correction_nu,
        implementation,
        block_sizes,
    )
    is_schedule = callable(learning_rate)

    def init_fn(params):
        lr_state = (
            optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))
            if is_schedule
            else optax.EmptyState()
        )
        return (_init_state(params, hp.mu_dtype), lr_state)

    def step_size_and_lr_state(state):
        amsgrad_state, lr_state = state
        if is_schedule:  # Evaluated at its own count, before the increment.
            step_size = -1 * learning_rate(lr_state.count)
            lr_state = optax.ScaleByScheduleState(
                count=optax.safe_increment(lr_state.count)
            )
        else:
            step_size = -1 * learning_rate
        return amsgrad_state, step_size, lr_state

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args  # The update does not depend on them.
        amsgrad_state, step_size, lr_state = step_size_and_lr_state(state)
        updates, amsgrad_state = _fused_update(
            updates, amsgrad_state, None, step_size, is_schedule, hp
        )
        return updates, (amsgrad_state, lr_state)

    def step_fn(grads, state, params):
        amsgrad_state, step_size, lr_state = step_size_and_lr_state(state)
        new_params, amsgrad_state = _fused_update(
            grads, amsgrad_state, params, step_size, is_schedule, hp
        )
        return new_params, (amsgrad_state, lr_state)

    return GradientTransformationWithStep(init_fn, update_fn, step_fn)
