"""Derivatives through the step on a mesh: the per-shard routes (shard_map,
custom_partitioning) have none of their own, so the step takes the XLA
path's on the whole arrays, which the partitioner splits (see `_sharding`).
On 8 devices they equal optax's, computed on the same sharded arrays."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import pytest
import tolerances
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import pallas_amsgrad

STEPS = 2


def _params(mesh):
    """A leaf split over both mesh axes and a replicated one."""
    return {
        "w": jax.device_put(
            jnp.linspace(-1, 1, 16 * 8).reshape(16, 8),
            NamedSharding(mesh, P("data", "model")),
        ),
        "b": jax.device_put(jnp.linspace(0.5, 2, 8), NamedSharding(mesh, P())),
    }


def _is_amsgrad(part):
    return isinstance(part, optax.ScaleByAmsgradState)


def _meta_loss(make_optimizer):
    """A loss of the moments after `STEPS` clipped steps (the clip's global
    norm is `sum_per_shard`'s), a function of (learning rate, max_grad_norm,
    params)."""

    def loss(learning_rate, max_grad_norm, params):
        opt = make_optimizer(learning_rate, max_grad_norm)
        state = opt.init(params)
        for step in range(STEPS):
            grads = jax.tree.map(lambda p, s=step: jnp.sin(3 * p + s), params)
            updates, state = opt.update(grads, state, params)
            params = optax.apply_updates(params, updates)
        (moments,) = [
            part
            for part in jax.tree.leaves(state, is_leaf=_is_amsgrad)
            if _is_amsgrad(part)
        ]
        # The moments, unlike the params (Adam's updates hardly change with
        # the gradients' scale), depend on the clip's well.
        return sum(jnp.sum(m) for m in jax.tree.leaves((moments.mu, moments.nu)))

    return loss


def _ours(implementation):
    return lambda learning_rate, max_grad_norm: pallas_amsgrad.amsgrad(
        learning_rate, max_grad_norm=max_grad_norm, implementation=implementation
    )


def _optax(learning_rate, max_grad_norm):
    return optax.chain(
        optax.clip_by_global_norm(max_grad_norm), optax.amsgrad(learning_rate)
    )


@pytest.mark.parametrize("implementation", ["pallas", "xla"])
@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit], ids=str)
def test_sharded_meta_gradient_equals_optaxs(axis_type, implementation):
    """d loss / d (learning rate, max_grad_norm, params) on a 4 x 2 mesh."""
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(axis_type,) * 2)
    with jax.set_mesh(mesh):
        params = _params(mesh)
        arguments = (jnp.float32(0.1), jnp.float32(1.0), params)
        gradients = [
            jax.jit(jax.grad(_meta_loss(make), argnums=(0, 1, 2)))(*arguments)
            for make in (_ours(implementation), _optax)
        ]
    tolerances.assert_trees_normwise_close(*gradients)
