"""Every tolerance of the suite, per dtype, and the ULP arithmetic behind them.

Errors are counted in ULPs (units in the last place) of the output's own dtype,
after the dtypes themselves have been asserted equal.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import amsgrad_spec as spec

# Kernel (interpret) and XLA path vs the spec, one step from the same state.
# All three compute in float32 (float64 for float64 leaves) with the same
# operations; they differ where XLA turns `x / broadcast(c)` into
# `x * (1 / c)`: up to 1.5 ULP in mu / bc1 and 1 ULP in nu_max (0.5 after the
# sqrt), which the final division and step-size product carry into the update
# (3 ULPs seen). A 16-bit output can flip its final rounding by 1 ULP.
IMPLEMENTATION_ULPS = {
    "float64": 4,
    "float32": 4,
    "bfloat16": 1,
    "float16": 1,
}

# The TPU interpreter evaluates the kernel's primitives its own way (as a real
# TPU, whose float32 divide and sqrt are not IEEE, does too): 5 ULPs seen in
# float32, within the bound `verify` allows deployed backends.
INTERPRETED_TPU_ULPS = {"float32": 8, "bfloat16": 1, "float16": 1}

# The GPU kernel takes sqrt as 1 / rsqrt (Mosaic GPU lowers no sqrt): two
# roundings where the spec has one, so a float32 result may differ by a few
# ULPs (2 seen); a 16-bit result, rounded from float32 once, by at most one.
INTERPRETED_GPU_ULPS = {"float32": 8, "bfloat16": 1, "float16": 1}

# Spec vs optax wherever optax rounds an intermediate below float32: 16-bit
# leaves (every intermediate in the leaf dtype) and a 16-bit mu_dtype (b1 * mu
# rounded to it before the sum, then the sum to mu_dtype again). The spec
# rounds once. Counted in ULPs of the narrowest such dtype, at the magnitude of
# the summands (see `summand_scales`), so cancellation in mu = (1-b1) g + b1 mu
# does not turn a rounding of the terms into an unbounded relative error.
# Measured maxima over the suite's draws were 3; the dev profile (50 draws per
# configuration) passes the bound for every param dtype x 16-bit mu_dtype.
SPEC_VS_OPTAX_ULPS = {
    "bfloat16": 6,
    "float16": 6,
}


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


def ulp_at(magnitude, dtype) -> np.ndarray:
    """The spacing of `dtype` at |magnitude| (the subnormal spacing near 0)."""
    finfo = jnp.finfo(dtype)
    magnitude = np.abs(np.asarray(magnitude, np.float64))
    exponent = np.floor(np.log2(np.maximum(magnitude, float(finfo.smallest_normal))))
    return np.exp2(exponent - finfo.nmant)


def scaled_ulp_error(actual, expected, scale, dtype=None) -> np.ndarray:
    """|actual - expected| in ULPs of `dtype` (theirs by default) at
    max(|expected|, scale)."""
    dtype = dtype or np.asarray(actual).dtype
    a = np.asarray(actual, np.float64)
    e = np.asarray(expected, np.float64)
    both_nan = np.isnan(a) & np.isnan(e)
    same_inf = np.isinf(a) & (a == e)
    with np.errstate(invalid="ignore"):
        error = np.abs(a - e) / ulp_at(np.maximum(np.abs(e), np.abs(scale)), dtype)
    error = np.where(both_nan | same_inf, 0.0, error)
    return np.where(np.isnan(error), np.inf, error)


def summand_scales(grads, state, params, hp):
    """Magnitudes against which (updates, state, params) errors are counted.

    The same spec step on |g| and |mu|, where no term can cancel, gives the
    size of the summands behind each output; a new param's is |p| + |u|. An
    error of one rounding of a summand is then one ULP at that scale, however
    much the summands cancel in the result.
    """
    updates, new_state = spec.update(
        jax.tree.map(jnp.abs, grads),
        state._replace(mu=jax.tree.map(jnp.abs, state.mu)),
        hp,
    )
    param_scales = jax.tree.map(
        lambda p, u: jnp.abs(p).astype(jnp.float32) + jnp.abs(u).astype(jnp.float32),
        params,
        updates,
    )
    return updates, tuple(new_state), param_scales


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
        actual, expected, dict.fromkeys(IMPLEMENTATION_ULPS, 0), context
    )


# Integration checks (optax.chain, MultiSteps, inject_hyperparams, checkpoints
# moved between implementations) compare trajectories, where last-bit
# differences compound and cancel over steps: errors are normwise, relative to
# each leaf's largest magnitude. Wiring mistakes are off by far more.
NORMWISE_RTOL = {"float32": 1e-5, "bfloat16": 2e-2, "float16": 2e-3}


def assert_trees_normwise_close(actual, expected, context=""):
    """Structure and dtypes exactly, then |a - e| <= rtol * max|e| per leaf."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected), context
    for (path, a), e in zip(
        jax.tree_util.tree_flatten_with_path(actual)[0],
        jax.tree.leaves(expected),
        strict=True,
    ):
        where = f"{context}{jax.tree_util.keystr(path)}"
        assert a.dtype == e.dtype, f"{where}: dtype {a.dtype} != {e.dtype}"
        a64, e64 = np.asarray(a, np.float64), np.asarray(e, np.float64)
        bound = NORMWISE_RTOL[jnp.dtype(a.dtype).name] * np.max(np.abs(e64), initial=0)
        np.testing.assert_allclose(a64, e64, rtol=0, atol=bound, err_msg=where)
