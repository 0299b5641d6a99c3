"""Every tolerance of the suite, per dtype, and the ULP arithmetic behind them.

Errors are counted in ULPs (units in the last place) of the output's own dtype,
after the dtypes themselves have been asserted equal.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import amsgrad_spec as spec
from pallas_amsgrad.tools import composition, ulps

# Kernel (interpreted) and XLA path vs the spec, one step from the same state,
# with IEEE arithmetic (conftest.py caps XLA:CPU below FMA); the reasoning is
# beside the table in pallas_amsgrad/tools/ulps.py, which `verify` shares.
IMPLEMENTATION_ULPS = ulps.IMPLEMENTATION_ULPS

# The TPU interpreter evaluates the kernel's primitives its own way (as a real
# TPU, whose float32 divide and sqrt are not IEEE, does too): held to the
# bound `verify` allows deployed backends.
INTERPRETED_TPU_ULPS = ulps.DEPLOYED_IMPLEMENTATION_ULPS

# The GPU kernel takes sqrt as 1 / rsqrt (Mosaic GPU lowers no sqrt): two
# roundings where the spec has one, so a float32 result may differ by a few
# ULPs; a 16-bit result, rounded from float32 once, by at most one.
INTERPRETED_GPU_ULPS = ulps.DEPLOYED_IMPLEMENTATION_ULPS

# Spec vs optax wherever optax rounds an intermediate below float32, counted
# in ULPs of the narrowest such dtype at the magnitude of the summands (see
# `summand_scales`); the dev profile (50 draws per configuration) passes it
# for every param dtype x 16-bit mu_dtype.
SPEC_VS_OPTAX_ULPS = ulps.SPEC_VS_OPTAX_ULPS


def _ordered_ints(x: np.ndarray) -> np.ndarray:
    """Maps floats to integers whose order and spacing are the floats' ULPs."""
    int_dtype = f"int{x.dtype.itemsize * 8}"
    bits = x.view(int_dtype).astype(np.int64)
    magnitude_bits = np.int64(np.iinfo(int_dtype).max)  # All but the sign bit.
    return np.where(bits < 0, -(bits & magnitude_bits), bits)


def ulp_distance(actual, expected) -> np.ndarray:
    """Elementwise ULPs between two arrays of one dtype; NaN == NaN is 0.

    Complex arrays are compared part by part (real and imaginary).
    """
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    actual, expected = np.atleast_1d(actual), np.atleast_1d(expected)
    if np.iscomplexobj(actual):
        parts = actual.real.dtype
        actual, expected = actual.view(parts), expected.view(parts)
    distance = np.abs(_ordered_ints(actual) - _ordered_ints(expected)).astype(
        np.float64
    )
    a_nan = np.isnan(actual.astype(np.float64))
    e_nan = np.isnan(expected.astype(np.float64))
    distance[a_nan & e_nan] = 0
    distance[a_nan ^ e_nan] = np.inf
    return distance


ulp_at = ulps.ulp_at
for_recipe = ulps.for_recipe
scaled_ulp_error = ulps.scaled_ulp_error


def summand_scales(grads, state, params, hp):
    """Magnitudes against which (updates, state, params) errors are counted.

    The same spec step on |g| and |mu|, where no term can cancel, gives the
    size of the summands behind each output; a new param's is |p| + |u|. An
    error of one rounding of a summand is then one ULP at that scale, however
    much the summands cancel in the result.
    """
    absolute = jax.tree.map(jnp.abs, params)
    if isinstance(state, spec.FiniteGuardState):
        inner = state.inner_state
        state = state._replace(
            inner_state=inner._replace(mu=jax.tree.map(jnp.abs, inner.mu))
        )
    else:
        state = state._replace(mu=jax.tree.map(jnp.abs, state.mu))
    updates, new_state = spec.update(jax.tree.map(jnp.abs, grads), state, hp, absolute)
    param_scales = jax.tree.map(
        lambda p, u: jnp.abs(p).astype(jnp.float32) + jnp.abs(u).astype(jnp.float32),
        params,
        updates,
    )
    return updates, composition.optax_state_of(new_state, hp, params), param_scales


def assert_trees_ulp_close(
    actual, expected, max_ulps: dict[str, int], context="", scales=None
):
    """Structure and dtypes exactly, then every leaf within its dtype's ULPs.

    With `scales` (a tree like `expected`), ULPs are counted at
    max(|expected|, scale); see `summand_scales`.
    """
    assert jax.tree.structure(actual) == jax.tree.structure(expected), context
    scale_leaves = [None] * len(jax.tree.leaves(expected))
    if scales is not None:
        scale_leaves = jax.tree.leaves(scales)
    for path_and_a, e, scale in zip(
        jax.tree_util.tree_flatten_with_path(actual)[0],
        jax.tree.leaves(expected),
        scale_leaves,
        strict=True,
    ):
        path, a = path_and_a
        where = f"{context}{jax.tree_util.keystr(path)}"
        assert a.dtype == e.dtype, f"{where}: dtype {a.dtype} != {e.dtype}"
        assert a.shape == e.shape, f"{where}: shape {a.shape} != {e.shape}"
        if a.size == 0:
            continue
        if not jnp.issubdtype(a.dtype, jnp.inexact):  # The step count.
            np.testing.assert_array_equal(a, e, err_msg=where)
            continue
        if scale is None:
            worst = ulp_distance(a, e).max()
        else:
            worst = scaled_ulp_error(a, e, scale).max()
        bound = max_ulps[jnp.dtype(a.dtype).name]
        assert worst <= bound, (
            f"{where}: {worst} ULPs > {bound}; actual {a.ravel()[:4]}, "
            f"expected {e.ravel()[:4]}"
        )


def assert_trees_equal(actual, expected, context=""):
    """Structure, dtypes, shapes and bits all equal (NaN equal to NaN)."""
    assert_trees_ulp_close(
        actual,
        expected,
        dict.fromkeys([*IMPLEMENTATION_ULPS, "complex64", "complex128"], 0),
        context,
    )


# Integration checks (optax.chain, MultiSteps, inject_hyperparams, checkpoints
# moved between implementations) compare trajectories, where last-bit
# differences compound and cancel over steps: errors are normwise, relative to
# each leaf's largest magnitude. Wiring mistakes are off by far more.
NORMWISE_RTOL = {
    "float64": 1e-13,
    "float32": 1e-5,
    "bfloat16": 2e-2,
    "float16": 2e-3,
    "complex64": 1e-5,  # Each part, relative to the leaf's largest modulus.
    "complex128": 1e-13,
}


# Derivatives through the optimizer (grad, jvp, vjp over a step or a few)
# are compared as trajectories are, against optax's with NORMWISE_RTOL (of
# the narrowest dtype the values pass through). A kernel's are the XLA path's
# own computation (`_sharding.per_shard`): they can differ from the XLA
# path's only where the kernel's values do (a device's few ULPs, carried into
# the next step's derivatives) or where XLA sums a transpose in another
# order; the suite's cases give equal bits.
KERNEL_VS_XLA_DERIVATIVE_RTOL = {"float32": 1e-6, "bfloat16": 2**-7}


def assert_trees_normwise_close(actual, expected, context="", rtol=None):
    """Structure and dtypes exactly, then |a - e| <= rtol * max|e| per leaf
    (integer and bool leaves exactly); `rtol` maps dtype names to bounds,
    NORMWISE_RTOL by default."""
    rtol = NORMWISE_RTOL if rtol is None else rtol
    assert jax.tree.structure(actual) == jax.tree.structure(expected), context
    for (path, a), e in zip(
        jax.tree_util.tree_flatten_with_path(actual)[0],
        jax.tree.leaves(expected),
        strict=True,
    ):
        where = f"{context}{jax.tree_util.keystr(path)}"
        assert a.dtype == e.dtype, f"{where}: dtype {a.dtype} != {e.dtype}"
        if not jnp.issubdtype(a.dtype, jnp.inexact):  # Counts and flags.
            np.testing.assert_array_equal(a, e, err_msg=where)
            continue
        wide = np.complex128 if np.iscomplexobj(e) else np.float64
        a64, e64 = np.asarray(a, wide), np.asarray(e, wide)
        bound = rtol[jnp.dtype(a.dtype).name] * np.max(np.abs(e64), initial=0)
        np.testing.assert_allclose(a64, e64, rtol=0, atol=bound, err_msg=where)
