"""The kernel in Pallas' generic interpreter: any backend, one call per leaf.

What runs where no Mosaic kernel can (CPU, float64 leaves): each leaf goes
through its (rows, 128) view into one `pallas_call` over a 1-D grid of row
blocks, which the interpreter evaluates as XLA ops.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_amsgrad import _math, _quantization, _rounding
from pallas_amsgrad.kernels import common


def amsgrad_interpreted_group(
    coefficients: jax.Array,
    leaves: Sequence[Sequence[jax.Array]],
    *,
    out_dtypes: Sequence[jnp.dtype],
    block_rows: int,
    operands: _math.Operands,
    table: jax.Array | None = None,
    whole_shapes: Sequence[tuple[int, ...]] | None = None,
) -> list[tuple[jax.Array, ...]]:
    """Per leaf (none empty), its outputs in the leaf's shape. Where the
    group rounds stochastically, `table` is `dispatch`'s flat stream table
    and `whole_shapes` the shapes of the leaves the leaves are shards of."""
    width = _rounding.TABLE_WIDTH
    leaf_step = _quantized_leaf if operands.quantizes else _interpreted_leaf
    return [
        leaf_step(
            coefficients,
            leaf,
            out_dtypes=out_dtypes,
            block_rows=block_rows,
            operands=operands,
            streams=None if table is None else table[width * k : width * (k + 1)],
            shard_runs=None
            if whole_shapes is None
            else _rounding.runs(leaf[0].shape, whole_shapes[k]),
        )
        for k, leaf in enumerate(leaves)
    ]


def _interpreted_leaf(
    coefficients, leaf, *, out_dtypes, block_rows, operands, streams, shard_runs
):
    outputs = _amsgrad_pallas(
        coefficients,
        streams,
        *map(common.as_rows, leaf),
        out_dtypes=out_dtypes,
        block_rows=block_rows,
        operands=operands,
        shard_runs=shard_runs,
    )
    return tuple(common.from_rows(out, leaf[0].shape) for out in outputs)


def _amsgrad_pallas(
    coefficients, streams, *arrays, out_dtypes, block_rows, operands, shard_runs
):
    """One interpreted pallas_call over (rows, 128) arrays; outputs alias
    matching inputs. `streams` (the leaf's four keys and base) and
    `shard_runs` are None where nothing rounds stochastically."""
    rows = arrays[0].shape[0]
    block_rows = min(block_rows, rows)  # A block may span the whole array.
    block = pl.BlockSpec((block_rows, common.LANES), lambda i: (i, 0))
    scalars = [coefficients] + ([] if streams is None else [streams])
    aliases = {
        len(scalars) + k: out  # The scalars come first.
        for k, out in common.aliased_outputs(arrays, out_dtypes, operands).items()
    }

    def kernel(coefficients_ref, *refs):
        if streams is None:
            return common.amsgrad_kernel(coefficients_ref, *refs, operands=operands)
        streams_ref, *refs = refs
        keys, base = common.table_row(streams_ref, 0)
        first_row = pl.program_id(0) * block_rows
        return common.amsgrad_kernel(
            coefficients_ref,
            *refs,
            operands=operands,
            keys=keys,
            index=lambda: common.rows_index(
                base, first_row, (block_rows, common.LANES), shard_runs
            ),
        )

    smem = pl.BlockSpec(memory_space=pltpu.SMEM)
    return pl.pallas_call(
        kernel,
        grid=(pl.cdiv(rows, block_rows),),
        in_specs=[smem] * len(scalars) + [block] * len(arrays),
        out_specs=[block] * len(out_dtypes),
        out_shape=[
            common.out_type((rows, common.LANES), d, [*arrays, coefficients])
            for d in out_dtypes
        ],
        input_output_aliases=aliases,
        interpret=True,
        name="amsgrad",  # pragma: no mutate
    )(*scalars, *arrays)


def _quantized_leaf(
    coefficients, leaf, *, out_dtypes, block_rows, operands, streams, shard_runs
):
    """A leaf with quantized moments, through its (rows, last dim) view in
    blocks of whole rows, so that every quantization block (and each scale)
    lies in one grid step; the body reads and stores the moments as the XLA
    path does (`_quantization.read_leaf`, `store_leaf`)."""
    shape = leaf[0].shape
    n = shape[-1]
    rows = math.prod(shape[:-1])
    # The most whole rows within block_rows * 128 elements that divide the rows.
    limit = max(1, block_rows * common.LANES // n)
    step_rows = max(d for d in range(1, min(rows, limit) + 1) if rows % d == 0)
    views = [x.reshape(rows, x.shape[-1]) for x in leaf]
    out_shapes = [
        common.out_type(
            (rows, _quantization.scale_shape(shape, operands.block)[-1])
            if name.endswith("_scales")
            else (rows, n),
            d,
            [*views, coefficients],
        )
        for name, d in zip(operands.outputs, out_dtypes, strict=True)
    ]
    scalars = [coefficients] + ([] if streams is None else [streams])
    aliases = {
        len(scalars) + k: out
        for k, out in common.aliased_outputs(views, out_dtypes, operands).items()
    }
    # The skip selects between the stored outputs and the inputs as they are.
    decoded = operands.decoded().with_terms(
        dataclasses.replace(operands.terms, skip=False)
    )

    def spec_of(width):
        return pl.BlockSpec((step_rows, width), lambda i: (i, 0))

    def kernel(coefficients_ref, *refs):
        keys = index = None
        if streams is not None:
            streams_ref, *refs = refs
            keys, base = common.table_row(streams_ref, 0)
            first = pl.program_id(0) * step_rows * n

            def index():
                local = (
                    jnp.asarray(first, jnp.uint32)
                    + common.iota((step_rows, n), 0) * jnp.uint32(n)
                    + common.iota((step_rows, n), 1)
                )
                offset = _rounding.whole_offset(local, shard_runs)
                return jnp.asarray(base, jnp.uint32) + offset

        in_refs = refs[: len(operands.inputs)]
        out_refs = refs[len(operands.inputs) :]
        dtype = coefficients_ref.dtype
        inputs = [ref[...] for ref in in_refs]
        outputs = _math.step_block(
            _quantization.read_leaf(inputs, operands, dtype),
            _math.Coefficients.unpack(coefficients_ref),
            decoded,
        )
        stored = _quantization.store_leaf(
            outputs, [ref.dtype for ref in out_refs], operands, keys, index
        )
        if operands.terms.skip:
            stored = _quantization.unless_accepted(
                stored, inputs, operands, common.accepts(coefficients_ref)
            )
        for out_ref, value in zip(out_refs, stored, strict=True):
            out_ref[...] = value

    smem = pl.BlockSpec(memory_space=pltpu.SMEM)
    outputs = pl.pallas_call(
        kernel,
        grid=(rows // step_rows,),
        in_specs=[smem] * len(scalars) + [spec_of(x.shape[-1]) for x in views],
        out_specs=[spec_of(t.shape[-1]) for t in out_shapes],
        out_shape=out_shapes,
        input_output_aliases=aliases,
        interpret=True,
        name="amsgrad_quantized",  # pragma: no mutate
    )(*scalars, *views)
    return tuple(out.reshape(*shape[:-1], out.shape[-1]) for out in outputs)
