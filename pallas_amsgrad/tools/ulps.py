"""Errors in ULPs, and the bounds they are held to: shared by `verify` and the
test suite (tests/tolerances.py), so both judge with the same arithmetic.

An error is counted in ULPs (units in the last place) of a dtype at the
magnitude of the summands behind the result, max(|expected|, scale), so that
cancellation in e.g. mu = (1-b1) g + b1 mu does not turn one rounding of a
term into an unbounded relative error.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

# An implementation (kernel or XLA path) against the spec, one step from the
# same state, under IEEE arithmetic (op for op; the test suite caps XLA:CPU
# below FMA). All compute in float32 (float64 for float64 leaves); they differ
# where XLA turns `x / broadcast(c)` into `x * (1 / c)`: up to 1.5 ULP in
# mu / bc1 and 1 ULP in nu_max (0.5 after the sqrt), which the final division
# and step-size product carry into the update. A 16-bit output, rounded once
# from float32, can flip its final rounding by 1 ULP.
IMPLEMENTATION_ULPS = {"float64": 4, "float32": 4, "bfloat16": 1, "float16": 1}

# The same, on a backend as deployed: XLA:CPU and GPUs contract a*b + c into
# FMAs wherever a fusion allows, and TPUs and the GPU kernel (sqrt as
# 1 / rsqrt) round differently from IEEE; each saves or adds a rounding the
# spec makes.
DEPLOYED_IMPLEMENTATION_ULPS = {"float64": 8, "float32": 8, "bfloat16": 1, "float16": 1}

# The recipe's terms add to either bound. Clipping: optax scales a gradient
# as (g / norm) * max_grad_norm, two roundings, and every implementation as
# g * scale with scale = max_grad_norm / norm, two others: the clipped
# gradient may differ by up to 2 ULPs, its square (in nu) by 4, carried into
# the update through mu and sqrt(nu_max). Weight decay: the direction's error
# is carried into direction + weight_decay * param, whose rounding may then
# flip once more. A 16-bit output still flips its final rounding at most once.
CLIPPING_EXTRA_ULPS = {"float64": 4, "float32": 4, "bfloat16": 0, "float16": 0}
DECAY_EXTRA_ULPS = {"float64": 1, "float32": 1, "bfloat16": 0, "float16": 0}


# optax's own composition clips in a 16-bit leaf's dtype: its global norm is
# summed and rounded in it, and g / norm * max_grad_norm rounds twice more, so
# its clipped gradient (and through mu and sqrt(nu) its update) carries up to
# 2 ULPs of that dtype beyond SPEC_VS_OPTAX_ULPS.
OPTAX_CLIPPING_EXTRA_ULPS = {"bfloat16": 2, "float16": 2}


def for_recipe(
    max_ulps: dict[str, int], *, clips: bool, decays: bool, optax: bool = False
) -> dict[str, int]:
    """`max_ulps` for a step with clipping and/or weight decay (`optax`: as
    optax's composition computes it)."""
    extras = [CLIPPING_EXTRA_ULPS] * clips + [DECAY_EXTRA_ULPS] * decays
    extras += [OPTAX_CLIPPING_EXTRA_ULPS] * (clips and optax)
    return {k: v + sum(e.get(k, 0) for e in extras) for k, v in max_ulps.items()}


# The spec against optax wherever optax rounds an intermediate below float32:
# 16-bit leaves (every intermediate in the leaf dtype) and a 16-bit mu_dtype
# (b1 * mu rounded to it before the sum). The spec rounds once. Counted in
# ULPs of the narrowest dtype optax rounds to.
SPEC_VS_OPTAX_ULPS = {"bfloat16": 6, "float16": 6}


def ulp_at(magnitude, dtype) -> np.ndarray:
    """The spacing of `dtype` at |magnitude| (the subnormal spacing near 0)."""
    finfo = jnp.finfo(dtype)
    magnitude = np.abs(np.asarray(magnitude, np.float64))
    exponent = np.floor(np.log2(np.maximum(magnitude, float(finfo.smallest_normal))))
    return np.exp2(exponent - finfo.nmant)


def scaled_ulp_error(actual, expected, scale, dtype=None) -> np.ndarray:
    """|actual - expected| in ULPs of `dtype` (actual's by default) at
    max(|expected|, |scale|), elementwise; NaN against NaN and an infinity
    against itself are 0, any other NaN is inf."""
    dtype = dtype or np.asarray(actual).dtype
    a = np.asarray(actual, np.float64)
    e = np.asarray(expected, np.float64)
    both_nan = np.isnan(a) & np.isnan(e)
    same_inf = np.isinf(a) & (a == e)
    with np.errstate(invalid="ignore"):
        # fmax: a NaN scale (from non-finite gradients) counts as no scale.
        error = np.abs(a - e) / ulp_at(np.fmax(np.abs(e), np.abs(scale)), dtype)
    error = np.where(both_nan | same_inf, 0.0, error)
    return np.where(np.isnan(error), np.inf, error)
