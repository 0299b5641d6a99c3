"""The kernel in Pallas' generic interpreter: any backend, one call per leaf.

What runs where no Mosaic kernel can (CPU, float64 leaves): each leaf goes
through its (rows, 128) view into one `pallas_call` over a 1-D grid of row
blocks, which the interpreter evaluates as XLA ops.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_amsgrad import _math
from pallas_amsgrad.kernels import common


def amsgrad_interpreted_group(
    coefficients: jax.Array,
    leaves: Sequence[Sequence[jax.Array]],
    *,
    out_dtypes: Sequence[jnp.dtype],
    block_rows: int,
    operands: _math.Operands,
) -> list[tuple[jax.Array, ...]]:
    """Per leaf (none empty), its outputs in the leaf's shape."""
    return [
        _interpreted_leaf(
            coefficients,
            leaf,
            out_dtypes=out_dtypes,
            block_rows=block_rows,
            operands=operands,
        )
        for leaf in leaves
    ]


def _interpreted_leaf(coefficients, leaf, *, out_dtypes, block_rows, operands):
    outputs = _amsgrad_pallas(
        coefficients,
        *map(common.as_rows, leaf),
        out_dtypes=out_dtypes,
        block_rows=block_rows,
        operands=operands,
    )
    return tuple(common.from_rows(out, leaf[0].shape) for out in outputs)


def _amsgrad_pallas(coefficients, *arrays, out_dtypes, block_rows, operands):
    """One interpreted pallas_call over (rows, 128) arrays; outputs alias
    matching inputs."""
    rows = arrays[0].shape[0]
    block_rows = min(block_rows, rows)  # A block may span the whole array.
    block = pl.BlockSpec((block_rows, common.LANES), lambda i: (i, 0))
    aliases = {
        1 + k: out  # Operand 0 is the coefficients.
        for k, out in common.aliased_outputs(arrays, out_dtypes, operands).items()
    }
    return pl.pallas_call(
        functools.partial(common.amsgrad_kernel, operands=operands),
        grid=(pl.cdiv(rows, block_rows),),
        in_specs=[pl.BlockSpec(memory_space=pltpu.SMEM)] + [block] * len(arrays),
        out_specs=[block] * len(out_dtypes),
        out_shape=[
            common.out_type((rows, common.LANES), d, [*arrays, coefficients])
            for d in out_dtypes
        ],
        input_output_aliases=aliases,
        interpret=True,
        name="amsgrad",  # pragma: no mutate
    )(coefficients, *arrays)
