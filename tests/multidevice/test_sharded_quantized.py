"""8-bit state on 8 devices: each shard's codes and scales are its own, with
the unsharded step's bits; a sharding that cuts a quantization block is
refused, naming the leaf."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import leaf_tables
import pytest
import test_sharded_step as sharded
import tolerances
from implementations import tpu_interpreted
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import pallas_amsgrad

# Quantized leaves (at least 4096 elements) split along their rows, their
# last dim in whole 128-blocks, both, and a tail block; and a small leaf.
LEAVES = {
    "embed": ((64, 256), jnp.float32, P("data", "model")),
    "w": ((32, 256), jnp.bfloat16, P(None, "model")),
    "heads": ((8, 4, 300), jnp.bfloat16, P("data", None, None)),
    "b": ((128,), jnp.float32, P("data")),
}
BLOCK = 128


def optimizer(implementation, block=BLOCK, stochastic_rounding=True, max_grad_norm=1.0):
    return pallas_amsgrad.amsgrad(
        0.01,
        mu_dtype=jnp.int8,
        nu_dtype=jnp.uint8,
        quantization_block=block,
        stochastic_rounding=stochastic_rounding,
        seed=3,
        max_grad_norm=max_grad_norm,
        implementation=sharded.on_cpu(implementation),
    )


def shardings(mesh):
    return jax.tree.map(
        lambda leaf: NamedSharding(mesh, leaf[2]), LEAVES, is_leaf=leaf_tables.is_leaf
    )


def values(seed):
    return leaf_tables.host_values(LEAVES, seed)


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit], ids=str)
def test_sharded_8_bit_state_equals_unsharded(implementation, axis_type):
    opt = optimizer(implementation)
    grads = [values(1 + i) for i in range(sharded.STEPS)]
    params = values(0)
    expected = sharded.run(opt, "step", params, opt.init(params), grads)[:2]
    mesh = sharded.make_mesh("2d", axis_type)
    param_shardings = shardings(mesh)
    with jax.set_mesh(mesh):
        sharded_params = sharded.place(params, param_shardings)
        sharded_grads = [sharded.place(g, param_shardings) for g in grads]
        state = opt.init(sharded_params)
        scales = state[1].nu_max["embed"].scales
        assert scales.sharding.is_equivalent_to(param_shardings["embed"], 2)
        actual = sharded.run(opt, "step", sharded_params, state, sharded_grads)[:2]
    tolerances.assert_trees_equal(actual, expected)
    assert isinstance(actual[1][1].mu["w"], pallas_amsgrad.QuantizedArray)


def test_tpu_kernel_steps_each_shard_as_the_unsharded_xla_path():
    """The TPU kernel (in Pallas' TPU interpreter) per shard: each shard's
    blocks, scales and stochastic bits are those of its place in the leaf.

    Without clipping: the global norm of sharded gradients, summed in this
    program's order, can differ from the XLA path's in its last bit. One
    simulated core: with two on each of 8 devices the interpreter stalls."""
    params, grads = values(0), [values(1 + i) for i in range(sharded.STEPS)]
    xla = optimizer("xla", max_grad_norm=None)
    expected = sharded.run(xla, "step", params, xla.init(params), grads)[:2]
    opt = optimizer(tpu_interpreted(1024, num_cores_or_threads=1), max_grad_norm=None)
    mesh = sharded.make_mesh("2d", AxisType.Explicit)
    param_shardings = shardings(mesh)
    with jax.set_mesh(mesh):
        sharded_params = sharded.place(params, param_shardings)
        sharded_grads = [sharded.place(g, param_shardings) for g in grads]
        state = opt.init(sharded_params)
        actual = sharded.run(opt, "step", sharded_params, state, sharded_grads)[:2]
    tolerances.assert_trees_equal(actual, expected)


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit], ids=str)
def test_sharding_that_cuts_a_block_is_refused(axis_type):
    """Blocks of 256 in a last dim of 384 (a block and a tail) split in two:
    each shard of 192 would cut the first block. Refused at init, and at the
    step for a state sharded so by hand (its scales split evenly)."""
    opt = optimizer("xla", block=256)
    mesh = sharded.make_mesh("2d", axis_type)
    split = NamedSharding(mesh, P(None, "model"))
    params = {"x": jnp.ones((16, 384))}
    state = opt.init(params)
    with jax.set_mesh(mesh):
        sharded_params = jax.device_put(params, split)
        with pytest.raises(ValueError, match=r"params\['x'\] .*cuts a quantization"):
            opt.init(sharded_params)
        state = jax.tree.map(
            lambda a: jax.device_put(
                a, split if a.ndim == 2 else NamedSharding(mesh, P())
            ),
            state,
        )
        # Under Auto axes, from the partitioner's callback while compiling.
        with pytest.raises(
            (ValueError, jax.errors.JaxRuntimeError),
            match=r"params\['x'\] .*cuts a quantization",
        ):
            jax.jit(opt.step)(sharded_params, state, sharded_params)
        with pytest.raises(ValueError, match=r"params\['x'\] .*cuts a quantization"):
            opt.step(sharded_params, state, sharded_params)  # Concrete: at once.
