"""What every Pallas kernel shares: the body, block sizes, views, aliases, cost.

The body `amsgrad_kernel` loads a block of each operand, runs
`_math.step_block` in the compute dtype and stores the results; the TPU,
GPU and interpreted kernels differ only in how blocks reach it.
`quantized_kernel` is the body for 8-bit state, block by quantization block.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from pallas_amsgrad import _math, _quantization, _rounding

LANES = 128
# Rows of a block must tile bfloat16/float16 on TPU (16 sublanes when packed).
ROW_MULTIPLE = 16
# Mosaic TPU's default scoped VMEM limit on v5e (the smallest of v4/v5e/v5p/v6e).
TPU_VMEM_BYTES = 16 * 1024 * 1024
# Dynamic shared memory per block on H100/H200, as Mosaic GPU checks it.
GPU_SMEM_BYTES = 232448
# Flops per element of `_math.amsgrad_block` plus the param add (counted by hand).
FLOPS_PER_ELEMENT = 15

COMPILED_PLATFORMS = ("tpu", "cuda")


@dataclasses.dataclass(frozen=True)
class BlockSizes:  # pragma: no mutate block
    """Rows of 128 lanes per grid step. Frozen, so it can be a static jit arg."""

    block_rows: int

    def __post_init__(self):
        if (
            not isinstance(self.block_rows, int)
            or self.block_rows <= 0
            or self.block_rows % ROW_MULTIPLE
        ):
            raise ValueError(
                f"block_rows={self.block_rows!r} must be a positive multiple of "
                f"{ROW_MULTIPLE}"
            )

    @classmethod
    def get_default(cls, platform: str) -> BlockSizes:
        """Defaults per target, each fitting its on-chip memory for any dtypes.

        tpu: 1024 x 128 (512 KiB per float32 array; 9 MiB double-buffered).
        cuda: 16 x 128 (8 KiB per float32 array, 72 KiB for all nine): the
          pipelined kernel holds as many blocks of each array as fit the 227
          KiB of shared memory, up to `gpu.MAX_STAGES` (3 of nine float32
          arrays, 4 of 16-bit ones), to keep copies in flight while it
          computes; the per-block kernel one of each, three CUDA blocks to
          an SM.
        anything else runs Pallas' interpreter, whose cost grows with grid
          steps times array size: one block per leaf up to 8M elements.
        """
        block_rows = {"tpu": 1024, "cuda": 16}.get(platform, 1 << 16)
        return cls(block_rows=block_rows)


def on_chip_bytes(
    block_rows: int, dtypes: Sequence[jnp.dtype], platform: str
) -> int:  # pragma: no mutate block
    """On-chip bytes the kernel's blocks take on `platform` (all in/out blocks)."""
    per_row = LANES * sum(jnp.dtype(d).itemsize for d in dtypes)
    # Mosaic TPU double-buffers every block. On GPU this is one stage: the
    # pipelined kernel takes as many as fit (`gpu.ring_stages`), at least one.
    buffers = 2 if platform == "tpu" else 1
    return buffers * block_rows * per_row


def check_fits(
    block_sizes: BlockSizes, dtypes: Sequence[jnp.dtype], platform: str
):  # pragma: no mutate block
    """Raises if the blocks overflow VMEM (tpu) or shared memory (cuda)."""
    limit = {"tpu": TPU_VMEM_BYTES, "cuda": GPU_SMEM_BYTES}.get(platform)
    needed = on_chip_bytes(block_sizes.block_rows, dtypes, platform)
    if limit is not None and needed > limit:
        raise ValueError(
            f"{block_sizes} needs {needed} bytes of on-chip memory on {platform}, "
            f"more than its {limit}; use fewer block_rows"
        )


def as_rows(x: jax.Array) -> jax.Array:
    """A (rows, 128) view: free when the size divides into 128 lanes; else
    the leaf is padded with zeros (a copy), which compute to zeros."""
    flat = x.reshape(-1)
    if padding := -flat.size % LANES:
        flat = jnp.pad(flat, (0, padding))
    return flat.reshape(-1, LANES)


def from_rows(rows: jax.Array, shape: Sequence[int]) -> jax.Array:
    """The leaf back from its `as_rows` view, any padding cut off."""
    size = math.prod(shape)
    flat = rows.reshape(-1)
    # No slice when nothing was padded: it would stay in the exported program.
    return (flat[:size] if flat.size != size else flat).reshape(shape)


def out_type(shape, dtype, like: Sequence[jax.Array]) -> jax.ShapeDtypeStruct:
    """An output's type, varying over every mesh axis that `like` varies over.

    Inside a `shard_map` that checks how values vary over its axes
    (`check_vma=True`), a kernel's outputs must declare it; elsewhere the set
    is empty.
    """
    varying = frozenset().union(*(jax.typeof(x).mat.varying for x in like))
    return jax.ShapeDtypeStruct(
        shape, dtype, manual_axis_type=jax.sharding.ManualAxisType(varying=varying)
    )


def aliased_outputs(
    inputs: Sequence[jax.Array],
    out_dtypes: Sequence[jnp.dtype],
    operands: _math.Operands,
) -> dict[int, int]:
    """{input position: output position} for the arrays updated in place.

    Each input the step replaces is aliased to its output where their dtypes
    are equal; e.g. a mu promoted from bfloat16 to float32 is written to a new
    buffer.
    """
    return {
        k: out
        for k, out in operands.written_back().items()
        if inputs[k].dtype == out_dtypes[out]
    }


def group_aliases(
    leaves: Sequence[Sequence[jax.Array]],
    out_dtypes: Sequence[jnp.dtype],
    operands: _math.Operands,
) -> dict[int, int]:
    """`aliased_outputs` for a group: {flat input: flat output}, where the
    inputs are every leaf's in turn and the outputs every leaf's in turn."""
    return {
        len(leaf) * k + position: len(out_dtypes) * k + out
        for k, leaf in enumerate(leaves)
        for position, out in aliased_outputs(leaf, out_dtypes, operands).items()
    }


# A scheduling hint, left out of mutation testing: results do not depend on it.
def cost_estimate(
    elements: int,
    in_dtypes: Sequence[jnp.dtype],
    out_dtypes: Sequence[jnp.dtype],
    bytes_accessed: int | None = None,
) -> pl.CostEstimate:  # pragma: no mutate block
    """What a call costs, for XLA's scheduler: every array read or written
    once, FLOPS_PER_ELEMENT flops and one sqrt per element. Arrays not of
    the leaves' size (8-bit state's scales) need `bytes_accessed`."""
    if bytes_accessed is None:
        per_element = sum(np.dtype(d).itemsize for d in (*in_dtypes, *out_dtypes))
        bytes_accessed = per_element * elements
    return pl.CostEstimate(
        flops=FLOPS_PER_ELEMENT * elements,
        transcendentals=elements,
        bytes_accessed=bytes_accessed,
    )


def accepts(coefficients_ref) -> jax.Array:
    """Whether the finite guard accepts this step, read in a kernel."""
    return coefficients_ref[_math.Coefficients._fields.index("accept")] != 0


def load(ref):
    return ref[...]


def amsgrad_kernel(
    coefficients_ref,
    *refs,
    operands: _math.Operands,
    load: Callable = load,
    sqrt: Callable = jnp.sqrt,
    keys: Sequence[jax.Array] | None = None,
    index: Callable[[], jax.Array] | None = None,
):
    """The body: load blocks, run `step_block` in the compute dtype, store.

    `refs` are a leaf's input blocks in `operands` order, then its output
    blocks. Where `operands` rounds stochastically, `keys` are the leaf's
    four stream keys and `index()` gives each block element's flat index in
    the whole leaf (uint32, of the block's shape).
    """
    in_refs, out_refs = refs[: len(operands.inputs)], refs[len(operands.inputs) :]
    dtype = coefficients_ref.dtype
    # jnp.asarray(x, dtype), not x.astype(dtype): with dtype None the first
    # keeps the block's own dtype where the second takes jnp's default float.
    outputs = _math.step_block(
        [
            jnp.asarray(load(ref), _math.read_dtype(name, ref.dtype, dtype))
            for name, ref in zip(operands.inputs, in_refs, strict=True)
        ],
        _math.Coefficients.unpack(coefficients_ref),
        operands,
        sqrt=sqrt,
    )
    stored = _rounding.store(
        outputs,
        [ref.dtype for ref in out_refs],
        operands.stochastic,
        keys,
        index,
    )
    for out_ref, value in zip(out_refs, stored, strict=True):
        out_ref[...] = value


def quantized_kernel(
    coefficients_ref,
    *refs,
    operands: _math.Operands,
    keys: Sequence[jax.Array] | None = None,
    index: Callable[[pl.Slice], jax.Array] | None = None,
):
    """The body where moments are block-quantized: each ref holds whole
    quantization blocks along its last axis (whole rows, or a multiple of
    `operands.block` columns) and each scales ref a column per block.

    Per block, in a static loop: decode the moments with the block's scale,
    run `step_block` in the compute dtype, encode each new moment with its
    new max |x| (`_quantization.read_blocks`, `store_blocks`: the XLA path's
    arithmetic). Where `operands` rounds stochastically, `index(columns)`
    gives the flat index in the whole leaf (uint32) of each element of the
    tile's `columns` (a static `pl.ds`).
    """
    in_refs, out_refs = refs[: len(operands.inputs)], refs[len(operands.inputs) :]
    dtype = coefficients_ref.dtype
    coefficients = _math.Coefficients.unpack(coefficients_ref)
    out_dtypes = [ref.dtype for ref in out_refs]
    # A skip keeps codes and scales bitwise: a select after the store, not
    # one of decoded values that would then be encoded again.
    applied = operands.decoded().with_terms(
        dataclasses.replace(operands.terms, skip=False)
    )
    accept = accepts(coefficients_ref) if operands.terms.skip else None
    scales = {
        name: ref[...]
        for name, ref in zip(operands.inputs, in_refs, strict=True)
        if _is_scales(name)
    }
    fields = {}  # Per scales output, the tile's new exponent fields.
    width = in_refs[0].shape[-1]
    for column, start in enumerate(range(0, width, operands.block)):
        columns = pl.ds(start, min(operands.block, width - start))
        inputs = [
            _scale_field(scales[name], column)
            if _is_scales(name)
            else ref[_last_axis(ref, columns)]
            for name, ref in zip(operands.inputs, in_refs, strict=True)
        ]
        outputs = _math.step_block(
            _quantization.read_blocks(inputs, operands, dtype), coefficients, applied
        )
        stored = _quantization.store_blocks(
            outputs,
            out_dtypes,
            operands,
            keys,
            None if index is None else functools.partial(index, columns),
        )
        if accept is not None:
            stored = _quantization.unless_accepted(stored, inputs, operands, accept)
        for name, ref, value in zip(operands.outputs, out_refs, stored, strict=True):
            if not _is_scales(name):
                ref[_last_axis(ref, columns)] = value
            elif column == 0:
                fields[name] = jnp.broadcast_to(value, ref.shape)
            else:
                lanes = _lanes(ref.shape)
                fields[name] = jnp.where(lanes == column, value, fields[name])
    for name, ref in zip(operands.outputs, out_refs, strict=True):
        if _is_scales(name):
            ref[...] = _quantization.scales_of(fields[name])


def _is_scales(name: str) -> bool:
    return name.endswith("_scales")


def _last_axis(ref, columns):
    """An index of `ref` taking `columns` of its last axis, all of the rest."""
    return (slice(None),) * (len(ref.shape) - 1) + (columns,)


def _lanes(shape) -> jax.Array:
    return jax.lax.broadcasted_iota(jnp.int32, tuple(shape), len(shape) - 1)


def _scale_field(scales: jax.Array, column: int) -> jax.Array:
    """The exponent field of a scales tile's `column`, its last axis kept
    (size 1): picked by a lane mask and a max, which Mosaic lowers for any
    column (scales are never negative)."""
    if scales.shape[-1] > 1:
        picked = jnp.where(_lanes(scales.shape) == column, scales, 0.0)
        scales = jnp.max(picked, axis=-1, keepdims=True)
    return _quantization.field_of(scales)


def rows_index(
    base,
    first_row,
    shape,
    shard_runs: Sequence[_rounding.Run],
    layout: Callable | None = None,
) -> jax.Array:
    """The flat index in the whole leaf of each element of a (rows, 128)
    block whose first row is `first_row` of the `as_rows` view of a shard
    (`shard_runs`, `_rounding.runs`) that starts at the leaf's flat index
    `base`."""
    rows, lanes = (iota(shape, d, layout) for d in range(2))
    first = jnp.asarray(first_row, jnp.uint32) * jnp.uint32(LANES)
    local = first + rows * jnp.uint32(LANES) + lanes
    return jnp.asarray(base, jnp.uint32) + _rounding.whole_offset(local, shard_runs)


def iota(shape, dimension, layout: Callable | None = None) -> jax.Array:
    """uint32 positions along `dimension`, from an int32 iota (what every
    backend lowers); `layout` places it where the kernel needs (Mosaic GPU)."""
    positions = jax.lax.broadcasted_iota(jnp.int32, tuple(shape), dimension)
    if layout is not None:
        positions = layout(positions)
    return jax.lax.bitcast_convert_type(positions, jnp.uint32)


def table_row(table_ref, leaf) -> tuple[list[jax.Array], jax.Array]:
    """(the four keys, the base) of `leaf` (an int, or a traced index) in a
    `Streams.kernel_table`, read as scalars from a flat (leaves * 5,) ref."""
    width = _rounding.TABLE_WIDTH
    keys = [table_ref[leaf * width + j] for j in range(4)]
    return keys, table_ref[leaf * width + 4]
