"""The XLA path: the kernels' block math on whole arrays, no Pallas.

Each leaf is `_math.step_block` on the leaf itself, which XLA fuses into
loops (and fuses the apply into, for `step`). The reference implementation
beside the kernels, and the default where no kernel compiles (CPU).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from pallas_amsgrad import _math


def amsgrad_xla_group(
    coefficients: jax.Array,
    leaves: Sequence[Sequence[jax.Array]],
    *,
    out_dtypes: Sequence[jnp.dtype],
    operands: _math.Operands,
) -> list[tuple[jax.Array, ...]]:
    """Per leaf, its outputs in `operands` order, rounded to `out_dtypes`."""
    dtype = coefficients.dtype
    c = _math.Coefficients.unpack(coefficients)
    results = []
    for leaf in leaves:
        # jnp.asarray(x, dtype), as in the kernel body: exactly x.astype(dtype)
        # here, without astype(None)'s fall back to jnp's default float.
        outputs = _math.step_block([jnp.asarray(x, dtype) for x in leaf], c, operands)
        results.append(
            tuple(x.astype(d) for x, d in zip(outputs, out_dtypes, strict=True))
        )
    return results
