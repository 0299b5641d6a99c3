"""What the TPU and GPU kernels' 8-bit state tests share: the cases, their
values, the bitwise comparison with the XLA path and the exported step."""

from __future__ import annotations

import contextlib

import exporting
import jax
import jax.numpy as jnp
import numpy as np

import pallas_amsgrad


class Case:
    """One interpreted comparison: leaves (shape, dtype), the optimizer's
    options, and the kernel's block rows."""

    def __init__(self, leaves, block_rows, **options):
        self.leaves, self.block_rows, self.options = leaves, block_rows, options

    def optimizer(self, implementation):
        return pallas_amsgrad.amsgrad(
            0.01,
            mu_dtype=jnp.int8,
            nu_dtype=jnp.uint8,
            implementation=implementation,
            **self.options,
        )

    def kernel(self):
        """A context in which the kernel runs as the case asks."""
        return contextlib.nullcontext()


def leaves(case, seed):
    rng = np.random.default_rng(seed)
    return {
        name: jnp.asarray(rng.normal(size=shape) * np.exp(rng.uniform(-4, 2)), dtype)
        for name, (shape, dtype) in case.leaves.items()
    }


def warm_state(case, params):
    """The state after one XLA step: codes and scales not all zero."""
    xla = case.optimizer("xla")
    _, state = jax.jit(xla.step)(leaves(case, 1), xla.init(params), params)
    return state


def assert_bitwise(actual, expected, context=""):
    """Structure, dtypes, shapes and every bit equal."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected), context
    for (path, a), e in zip(
        jax.tree_util.tree_flatten_with_path(actual)[0],
        jax.tree.leaves(expected),
        strict=True,
    ):
        where = context + jax.tree_util.keystr(path)
        assert (a.dtype, a.shape) == (e.dtype, e.shape), where
        bits = np.dtype(f"uint{8 * a.dtype.itemsize}")
        np.testing.assert_array_equal(
            np.asarray(a).view(bits), np.asarray(e).view(bits), err_msg=where
        )


def check_step(case, interpreted, race_checked):
    """The kernel (`interpreted`, an interpreter's Pallas object) steps a
    warm state as the XLA path does, bitwise, under its interpreter's
    `race_checked()`."""
    params = leaves(case, 0)
    state, grads = warm_state(case, params), leaves(case, 2)
    kernel = case.optimizer(interpreted)
    expected = jax.jit(case.optimizer("xla").step)(grads, state, params)
    with case.kernel(), race_checked():
        actual = jax.jit(kernel.step)(grads, state, params)
    assert_bitwise(actual, expected)


def check_recipe_and_skips(case, interpreted, race_checked):
    """A finite step with the case's recipe, then a skipped `update` and
    `step`, as the XLA path's bitwise; the skipped step keeps the state."""
    params = leaves(case, 0)
    state, grads = warm_state(case, params), leaves(case, 2)
    skipped = {**grads, "w": grads["w"].at[3, 7].set(jnp.nan)}
    kernel = case.optimizer(interpreted)
    xla = case.optimizer("xla")
    with case.kernel(), race_checked():
        for context, fn, g in [
            ("step: ", "step", grads),
            ("skipped update: ", "update", skipped),
            ("skipped step: ", "step", skipped),
        ]:
            args = (g, state, params)
            expected = jax.jit(getattr(xla, fn))(*args)
            assert_bitwise(jax.jit(getattr(kernel, fn))(*args), expected, context)
    _, kept = expected
    assert_bitwise(kept.inner_state, state.inner_state, "skipped state: ")


def export_step(platform, shapes, dtype, block, implementation, **options):
    """The donated 8-bit training step on `shapes` of `dtype`, exported for
    `platform`."""
    opt = pallas_amsgrad.amsgrad(
        1e-3,
        mu_dtype=jnp.int8,
        nu_dtype=jnp.uint8,
        quantization_block=block,
        implementation=implementation,
        **options,
    )
    params = {k: jax.ShapeDtypeStruct(s, dtype) for k, s in shapes.items()}
    state = jax.eval_shape(opt.init, params)

    def train_step(params, state, grads):
        return opt.step(grads, state, params)

    step = jax.jit(train_step, donate_argnums=(0, 1))
    return exporting.export(step, platform, params, state, params)
