"""The XLA path: the kernels' block math on whole arrays, no Pallas.

Each leaf is `_math.step_block` on the leaf itself, which XLA fuses into
loops (and fuses the apply into, for `step`). The reference implementation
beside the kernels, and the default where no kernel compiles (CPU).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from pallas_amsgrad import _math, _quantization, _rounding


def amsgrad_xla_group(
    coefficients: jax.Array,
    leaves: Sequence[Sequence[jax.Array]],
    *,
    out_dtypes: Sequence[jnp.dtype],
    operands: _math.Operands,
    streams: _rounding.Streams | None = None,
) -> list[tuple[jax.Array, ...]]:
    """Per leaf, its outputs in `operands` order, rounded to `out_dtypes`
    (stochastically where `operands` says, by `streams`)."""
    c = _math.Coefficients.unpack(coefficients)
    if not operands.terms.skip:
        return _steps(c, leaves, out_dtypes, operands, coefficients.dtype, streams)
    # A skip as a branch rather than `step_block`'s select: XLA:CPU copies
    # mu, nu and nu_max before a step that selects between their old and new
    # values, and a skipped step need not read anything.
    applied = operands.with_terms(dataclasses.replace(operands.terms, skip=False))
    return jax.lax.cond(
        c.accept != 0,
        lambda: _steps(c, leaves, out_dtypes, applied, coefficients.dtype, streams),
        lambda: [_unchanged(leaf, out_dtypes, operands) for leaf in leaves],
    )


def _steps(c, leaves, out_dtypes, operands, dtype, streams):
    results = []
    decoded = operands.decoded()
    for k, leaf in enumerate(leaves):
        # jnp.asarray(x, dtype), as in the kernel body: exactly x.astype(dtype)
        # here, without astype(None)'s fall back to jnp's default float.
        outputs = _math.step_block(
            _quantization.read_leaf(leaf, operands, dtype), c, decoded
        )
        keys = index = None
        if operands.rounds_stochastically:
            keys = [streams.keys[k, j] for j in range(4)]
            index = functools.partial(streams.flat_index, k, leaf[0].shape)
        results.append(
            _quantization.store_leaf(
                outputs, out_dtypes, operands, keys, index, differentiable=True
            )
        )
    return results


def _unchanged(leaf, out_dtypes, operands):
    """A skipped step's outputs: the param as it was (or a zero update) and
    the moments (their codes and scales) as they were."""
    named = dict(zip(operands.inputs, leaf, strict=True))
    grad = named["grad"]
    return tuple(
        named[name].astype(d) if name in named else jnp.zeros(grad.shape, d)
        for name, d in zip(operands.outputs, out_dtypes, strict=True)
    )
