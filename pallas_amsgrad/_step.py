"""The step over a pytree: checks, dtype groups, coefficients, per-shard calls.

Leaves whose input and output dtypes match form a dtype group: one set of
coefficients, one call of the implementation (one kernel launch on TPU),
run per shard on a mesh by `_sharding.per_shard`.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from pallas_amsgrad import _implementations, _math, _sharding, _validation


class Hyperparams(NamedTuple):
    """The math of `scale_by_amsgrad`, as given (a Python float stays weak)."""

    b1: jax.typing.ArrayLike
    b2: jax.typing.ArrayLike
    eps: jax.typing.ArrayLike
    eps_root: jax.typing.ArrayLike
    mu_dtype: jnp.dtype | None
    bias_correction_mu: bool
    bias_correction_nu: bool


@functools.partial(jax.jit, inline=True)
def _bias_correction(decay, count):
    # Jitted with decay traced, exactly as optax's tree_bias_correction.
    return 1 - decay**count


def leaf_dtypes(grad, mu, nu, nu_max, hp: Hyperparams, step_size, is_schedule):
    """optax's dtypes for (update, mu, nu, nu_max), and the compute dtype.

    Written out from jnp's promotion of each of optax's expressions, with the
    hyperparameters as given (a Python float is weakly typed).
    """
    mu_new = jnp.result_type(1 - hp.b1, grad, hp.b1, mu)  # (1-b1)*g + b1*mu
    # (1-b2)*|g|**2 + b2*nu, where |g|**2 is real for a complex g.
    nu_new = jnp.result_type(1 - hp.b2, jnp.finfo(grad.dtype).dtype, hp.b2, nu)
    nu_max_new = jnp.result_type(nu_max, nu_new)  # maximum(nu_max, nu/bc)
    update = jnp.result_type(mu_new, nu_max_new, hp.eps_root, hp.eps)
    if step_size is not None and not is_schedule:  # A schedule is cast first.
        update = jnp.result_type(step_size, update)
    mu_state = hp.mu_dtype or mu_new
    compute = jnp.result_type(update, mu_new, nu_new, nu_max_new, jnp.float32)
    return (update, mu_state, nu_new, nu_max_new), compute


def fused_update(
    grads: Any,
    state: optax.ScaleByAmsgradState,
    params: Any,
    *,
    step_size: jax.typing.ArrayLike | None,
    is_schedule: bool,
    hp: Hyperparams,
    implementation: _implementations.Implementation,
) -> tuple[Any, optax.ScaleByAmsgradState]:
    """(updates, new state), or with `params` (new params, new state).

    Args:
      grads, state: the gradients and `optax.ScaleByAmsgradState`.
      params: None for the updates; else the params they are applied to.
      step_size: -learning_rate (evaluated), or None for `scale_by_amsgrad`.
      is_schedule: whether `step_size` came from a schedule (cast, not
        promoted, as optax does).
      hp: the hyperparameters.
      implementation: runs each dtype group.
    """
    checked = {"state.mu": state.mu, "state.nu": state.nu, "state.nu_max": state.nu_max}
    if params is not None:
        checked["params"] = params
    _validation.check_trees(grads, checked)
    operands = _math.STEP if params is not None else _math.UPDATE
    implementation = _implementations.for_device(
        implementation,
        _implementations.placed_device(jax.tree.leaves((grads, params, state))),
    )

    count = optax.safe_increment(state.count)
    corrections = (
        _bias_correction(hp.b1, count) if hp.bias_correction_mu else 1,
        _bias_correction(hp.b2, count) if hp.bias_correction_nu else 1,
    )

    grad_paths, treedef = jax.tree_util.tree_flatten_with_path(grads)
    paths = [jax.tree_util.keystr(path) for path, _ in grad_paths]
    flat_params = [None] * treedef.num_leaves
    if params is not None:
        flat_params = treedef.flatten_up_to(params)
    groups = {}
    for index, (param, grad, mu, nu, nu_max) in enumerate(
        zip(
            flat_params,
            jax.tree.leaves(grads),
            *(treedef.flatten_up_to(t) for t in (state.mu, state.nu, state.nu_max)),
            strict=True,
        )
    ):
        _validation.check_complex_leaf(paths[index], grad, mu, param, hp.mu_dtype)
        out_dtypes, compute = leaf_dtypes(
            grad, mu, nu, nu_max, hp, step_size, is_schedule
        )
        if param is not None:
            out_dtypes = (param.dtype, *out_dtypes[1:])
            compute = jnp.result_type(compute, param.dtype)
        inputs = (
            (grad, mu, nu, nu_max) if param is None else (param, grad, mu, nu, nu_max)
        )
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
        outputs = _sharding.per_shard(
            # The kernels are written for real dtypes: complex leaves take
            # the XLA path, the same block math.
            _implementations.IMPLEMENTATIONS["xla"]
            if jnp.issubdtype(compute, jnp.complexfloating)
            else implementation,
            coefficients.pack(compute),
            [inputs for _, inputs in members],
            paths=[paths[index] for index, _ in members],
            out_dtypes=out_dtypes,
            operands=operands,
        )
        for (index, _), leaf_outputs in zip(members, outputs, strict=True):
            results[index] = leaf_outputs
    first, mu, nu, nu_max = (
        treedef.unflatten([leaf_results[i] for leaf_results in results])
        for i in range(4)
    )
    return first, optax.ScaleByAmsgradState(count=count, mu=mu, nu=nu, nu_max=nu_max)
