"""The TPU step: one kernel launch per dtype group, every leaf in place.

A model has hundreds of leaves of many shapes. One `pallas_call` takes every
leaf of a dtype group, each left in HBM (`pl.ANY`) in its own shape, and
streams each through VMEM in turn with a double-buffered DMA loop: no
concatenation, no padding, no relayout, one launch instead of one per leaf.

Layers read top-down: `amsgrad_tpu_group` (views, aliases, `pallas_call`) ->
`_group_kernel` (each leaf's (leading, rows, cols) view cut into regions of
equal blocks) -> `_stream` (the DMA loop around `common.amsgrad_kernel`, the
same body as every other path, or `common.quantized_kernel` for 8-bit state,
whose blocks hold whole quantization blocks and their scales).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_amsgrad import _math, _rounding
from pallas_amsgrad.kernels import common

# The grid: one step per TensorCore of a megacore chip (v4, v5p), each taking
# half of every leaf's blocks. A single-core chip runs both steps in turn.
CORES = 2
# Per array: the next block's fetch overlaps this block's compute and the
# previous block's write-back.
SLOTS = 2
# Rows of a VMEM tile of 8-bit codes: blocks of 8-bit state take rows in
# multiples of it where they cut a leaf's rows.
CODE_ROW_MULTIPLE = 32


class Split(NamedTuple):
    """Equal blocks along one dim: `blocks` of `size` from `start`."""

    start: int
    size: int
    blocks: int


class Region(NamedTuple):
    """Equal blocks tiling part of a leaf's (leading, rows, cols) view: the
    whole leaf, or what a block size that does not divide leaves over."""

    leading: Split
    rows: Split
    cols: Split

    @property
    def block(self) -> tuple[int, int, int]:
        return (self.leading.size, self.rows.size, self.cols.size)

    def of_scales(self, block: int) -> Region:
        """The region of 8-bit state's scales, one per `block` columns, that
        goes with this region of its codes (whose column blocks hold whole
        quantization blocks, the tail's aside)."""
        cols = self.cols
        assert cols.blocks == 1 or cols.size % block == 0, (cols, block)
        return self._replace(
            cols=Split(cols.start // block, pl.cdiv(cols.size, block), cols.blocks)
        )

    def slices(self, positions) -> tuple[pl.Slice, ...]:
        """The (leading, rows, cols) slices of the block at `positions`, one
        (traced) block index per dim."""
        return tuple(
            pl.ds(split.start + position * split.size, split.size)
            for split, position in zip(self, positions, strict=True)
        )


def view_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    """The leaf as (leading, rows, cols), without moving data.

    TPU tiles the last two dims in HBM, so merging (or adding) leading dims is
    free while any reshape of the last two would make XLA relayout (copy) the
    leaf. Scalars and vectors, which Mosaic blocks only in two dims, take
    whole 128-lane rows when they divide and one row otherwise.
    """
    if len(shape) >= 2:
        return (math.prod(shape[:-2]), *shape[-2:])
    size = math.prod(shape)
    if size % common.LANES == 0:
        return (1, size // common.LANES, common.LANES)
    return (1, 1, size)


def quantized_view_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    """A leaf with 8-bit state (or its scales) as (leading, rows, cols) with
    cols its last dim, so that a block of columns holds whole quantization
    blocks: `view_shape`, but a vector is one row."""
    if len(shape) >= 2:
        return view_shape(shape)
    return (1, 1, *shape)


def block_shape(
    leading: int,
    rows: int,
    cols: int,
    elements: int,
    row_multiple: int = common.ROW_MULTIPLE,
    col_unit: int = common.LANES,
) -> tuple[int, int, int]:
    """A block of at most `elements` in VMEM, where rows pad to a multiple
    of `row_multiple` and columns to 128 lanes: several whole (rows, cols)
    slices where they fit, else whole rows where `row_multiple` fit, else
    part rows of a multiple of `col_unit` columns (at least one)."""
    lanes = common.LANES
    padded_cols = pl.cdiv(cols, lanes) * lanes
    padded_slice = pl.cdiv(rows, row_multiple) * row_multiple * padded_cols
    if padded_slice <= elements:
        return min(leading, elements // padded_slice), rows, cols
    if padded_cols * row_multiple <= elements:
        fitting_rows = elements // padded_cols // row_multiple * row_multiple
        return 1, fitting_rows, cols
    part_cols = max(col_unit, elements // row_multiple // col_unit * col_unit)
    return 1, min(rows, row_multiple), part_cols


def regions(
    shape: Sequence[int],
    elements: int,
    leading_unit: int | None = None,
    quantization_block: int | None = None,
) -> list[Region]:
    """Tiles a (leading, rows, cols) view with regions of equal blocks; with
    `leading_unit`, a block's leading extent divides it; with
    `quantization_block`, a block's columns are whole rows or a multiple of
    it, and its rows whole or a multiple of `CODE_ROW_MULTIPLE`."""

    def split(size, block):
        whole, tail = divmod(size, block)
        parts = [Split(0, block, whole)] if whole else []
        return parts + ([Split(whole * block, tail, 1)] if tail else [])

    tiling = {}
    if quantization_block is not None:
        tiling = dict(row_multiple=CODE_ROW_MULTIPLE, col_unit=quantization_block)
    block = block_shape(*shape, elements, **tiling)
    if leading_unit is not None:
        fitting = max(d for d in range(1, block[0] + 1) if leading_unit % d == 0)
        block = (fitting, *block[1:])
    return [Region(*parts) for parts in itertools.product(*map(split, shape, block))]


class ViewIndex(NamedTuple):
    """Where each element of a shard's (leading, rows, cols) view lies in its
    whole leaf, past the shard's first element (static).

    Attributes:
      leading: `_rounding.runs` of the dims merged into `leading`.
      row_stride: the whole leaf's stride of a row; a col's is 1.
    """

    leading: tuple[_rounding.Run, ...]
    row_stride: int

    @classmethod
    def of(cls, local_shape: Sequence[int], whole_shape: Sequence[int]) -> ViewIndex:
        if len(local_shape) < 2:  # A vector's shard is one run of it.
            return cls((), view_shape(local_shape)[2])
        leading = _rounding.runs(local_shape, whole_shape, len(local_shape) - 2)
        return cls(leading, whole_shape[-1])

    @property
    def leading_unit(self) -> int | None:
        """What a block's leading extent must divide, so that the block lies
        within one place of the outer leading runs, which scalar ops then
        find (the vector unit has no integer division): the innermost run's
        size, where there are several."""
        return self.leading[-1].size if len(self.leading) > 1 else None

    def offsets(self, slices) -> jax.Array:
        """uint32 of the block at `slices` (pl.ds, one per view dim): each
        element's offset from the shard's first in the whole leaf."""
        sizes = tuple(s.size for s in slices)
        lead, rows, cols = (common.iota(sizes, d) for d in range(3))
        lead0, row0, col0 = (s.start for s in slices)
        offsets = (_as_uint32(row0) + rows) * jnp.uint32(self.row_stride)
        offsets = offsets + _as_uint32(col0) + cols
        if not self.leading:
            return offsets
        *outer, inner = self.leading
        position, outer_offset = lead0, jnp.uint32(0)
        if outer:
            rest, position = _divmod(lead0, inner.size)
            for run in reversed(outer[1:]):
                rest, place = _divmod(rest, run.size)
                outer_offset = outer_offset + _as_uint32(place) * jnp.uint32(run.stride)
            outer_offset = outer_offset + _as_uint32(rest) * jnp.uint32(outer[0].stride)
        lead_offsets = (_as_uint32(position) + lead) * jnp.uint32(inner.stride)
        return offsets + outer_offset + lead_offsets


def _divmod(index, size: int):
    """(index // size, index % size) of a non-negative scalar int, by
    lax.div/rem: jnp's // and % fix up negative operands with `sign`, which
    Mosaic lowers only on a TPU. `size` takes the index's dtype (int32 under
    x64 too)."""
    size = jnp.asarray(size, jnp.asarray(index).dtype)
    return jax.lax.div(index, size), jax.lax.rem(index, size)


def _as_uint32(index) -> jax.Array:
    return jnp.asarray(index).astype(jnp.uint32)


def amsgrad_tpu_group(
    coefficients: jax.Array,
    leaves: Sequence[Sequence[jax.Array]],
    *,
    out_dtypes: Sequence[jnp.dtype],
    block_rows: int,
    operands: _math.Operands,
    table: jax.Array | None = None,
    whole_shapes: Sequence[tuple[int, ...]] | None = None,
    interpret: bool | pltpu.InterpretParams = False,
) -> list[tuple[jax.Array, ...]]:
    """One `pallas_call` for leaves sharing dtypes; outputs alias inputs.

    Args:
      coefficients: `_math.Coefficients` stacked in the compute dtype.
      leaves: per leaf, its ([param,] grad, mu, nu, nu_max), none empty.
      out_dtypes: dtypes of (param | update, mu, nu, nu_max) written.
      block_rows: a block holds at most `block_rows * 128` elements.
      operands: the order of each leaf's inputs and outputs.
      table: `dispatch`'s flat stream table (each leaf's four keys and base),
        where the group rounds stochastically.
      whole_shapes: with `table`, the shapes of the whole leaves that the
        leaves are shards of.
      interpret: `pltpu.InterpretParams` runs the kernel in Pallas' TPU
        interpreter, on any backend.

    Returns:
      Per leaf, its outputs in `operands` order, each in the shape of the
      input of its name (the leaf's for the update).
    """
    as_view = quantized_view_shape if operands.quantizes else view_shape
    views = [tuple(x.reshape(as_view(x.shape)) for x in leaf) for leaf in leaves]
    scalars = [coefficients]
    indices = [None] * len(leaves)
    if table is not None:
        indices = [
            ViewIndex.of(leaf[0].shape, whole)
            for leaf, whole in zip(leaves, whole_shapes, strict=True)
        ]
        # Rows in the order `_group_kernel` streams the leaves: by view shape
        # and index.
        kinds = [
            (leaf[0].shape, index) for leaf, index in zip(views, indices, strict=True)
        ]
        order = [
            k
            for kind in dict.fromkeys(kinds)
            for k, other in enumerate(kinds)
            if other == kind
        ]
        rows = table.reshape(-1, _rounding.TABLE_WIDTH)
        scalars.append(jnp.concatenate([rows[k] for k in order]))
    aliases = {  # The scalars come first.
        len(scalars) + i: out
        for i, out in common.group_aliases(views, out_dtypes, operands).items()
    }
    operand_count = sum(len(leaf) for leaf in views)
    # A skipped step where every output is written in place need not move a
    # byte: the aliased buffers already hold what it would write.
    skippable = operands.terms.skip and len(aliases) == len(out_dtypes) * len(views)
    out_shape = [
        common.out_type(_like(leaf, name, operands).shape, dtype, [*leaf, coefficients])
        for leaf in views
        for name, dtype in zip(operands.outputs, out_dtypes, strict=True)
    ]
    arrays = [*itertools.chain.from_iterable(views), *out_shape]
    hbm = pl.BlockSpec(memory_space=pl.ANY)
    outputs = pl.pallas_call(
        functools.partial(
            _group_kernel,
            view_shapes=[leaf[0].shape for leaf in views],
            view_indices=indices,
            inputs_per_leaf=len(views[0]),
            elements=block_rows * common.LANES,
            operands=operands,
            skippable=skippable,
        ),
        grid=(CORES,),
        in_specs=[pl.BlockSpec(memory_space=pltpu.SMEM)] * len(scalars)
        + [hbm] * operand_count,
        out_specs=[hbm] * len(out_shape),
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=pltpu.CompilerParams(  # pragma: no mutate
            dimension_semantics=("parallel",)
        ),
        cost_estimate=common.cost_estimate(  # pragma: no mutate
            sum(leaf[0].size for leaf in views),
            [a.dtype for a in views[0]],
            out_dtypes,
            bytes_accessed=sum(math.prod(a.shape) * a.dtype.itemsize for a in arrays),
        ),
        interpret=interpret,
        name="amsgrad_group",  # pragma: no mutate
    )(*scalars, *itertools.chain.from_iterable(views))
    per_leaf = len(out_dtypes)
    return [
        tuple(
            out.reshape(_like(leaf, name, operands).shape)
            for name, out in zip(
                operands.outputs,
                outputs[per_leaf * k : per_leaf * (k + 1)],
                strict=True,
            )
        )
        for k, leaf in enumerate(leaves)
    ]


def _like(leaf, name: str, operands: _math.Operands):
    """The input of a leaf whose shape the output `name` takes: the input of
    that name, else (the update) the leaf's first."""
    return dict(zip(operands.inputs, leaf, strict=True)).get(name, leaf[0])


def _group_kernel(
    coefficients_ref,
    *refs,
    view_shapes,
    view_indices,
    inputs_per_leaf,
    elements,
    operands,
    skippable,
):
    """Streams the leaves through VMEM: one DMA loop per region of each view
    shape, over every leaf of that shape, so the body is traced once per
    shape rather than once per leaf (a model repeats a few shapes per layer).
    Where the group rounds stochastically (`view_indices` given, per leaf a
    `ViewIndex`), the leaves of a shape are streamed apart by their index.
    If `skippable`, a step the finite guard rejects streams nothing."""
    table_ref = None
    if view_indices[0] is not None:
        table_ref, *refs = refs
    inputs = refs[: inputs_per_leaf * len(view_shapes)]
    outputs = refs[len(inputs) :]
    outputs_per_leaf = len(outputs) // len(view_shapes)
    body = functools.partial(
        common.quantized_kernel if operands.quantizes else common.amsgrad_kernel,
        coefficients_ref,
        operands=operands,
    )
    quantization_block = operands.block if operands.quantizes else None

    def per_array(region, names):
        """The region of each of `names`: a scales array's takes its columns."""
        return [
            region.of_scales(operands.block) if name.endswith("_scales") else region
            for name in names
        ]

    leaves_by_kind = {}
    for k, kind in enumerate(zip(view_shapes, view_indices, strict=True)):
        leaves_by_kind.setdefault(kind, []).append(
            (
                inputs[inputs_per_leaf * k : inputs_per_leaf * (k + 1)],
                outputs[outputs_per_leaf * k : outputs_per_leaf * (k + 1)],
            )
        )
    active = None
    if skippable:
        active = common.accepts(coefficients_ref)
    first_row = 0  # Of this kind's leaves in the reordered stream table.
    for (shape, view_index), leaves in leaves_by_kind.items():
        streams, leading_unit = None, None
        if table_ref is not None:
            streams = _Streams(table_ref, first_row, view_index)
            leading_unit = view_index.leading_unit
        for region in regions(shape, elements, leading_unit, quantization_block):
            in_regions = per_array(region, operands.inputs)
            out_regions = per_array(region, operands.outputs)
            _stream(body, leaves, in_regions, out_regions, active, streams)
        first_row += len(leaves)


class _Streams(NamedTuple):
    """Where a kind's leaves find their stream keys and bases."""

    table_ref: object
    first_row: int
    view_index: ViewIndex

    def for_block(self, leaf, slices) -> dict:
        """The body's `keys` and `index` for a block of the kind's `leaf`-th
        leaf at `slices` of its (leading, rows, cols) view. `index` gives the
        whole block's element indices, or with `columns` (a static `pl.ds`
        of the block's cols) those of those columns."""
        keys, base = common.table_row(self.table_ref, self.first_row + leaf)

        def index(columns=None):
            narrowed = slices
            if columns is not None:
                lead, rows, cols = slices
                start = cols.start + columns.start
                narrowed = (lead, rows, pl.ds(start, columns.size))
            return base + self.view_index.offsets(narrowed)

        return dict(keys=keys, index=index)


def _stream(
    body,
    leaves,
    in_regions: Sequence[Region],
    out_regions: Sequence[Region],
    active=None,
    streams=None,
):
    """Double-buffered DMA loop over a region's blocks in every leaf of
    `leaves` ((inputs, outputs) per leaf, all of one shape), shared by the
    cores. Each array has its region (`in_regions`, `out_regions`): the
    same count of blocks per dim, of its own size (8-bit state's scales).

    Blocks are disjoint, so fetching block i+1 while block i-1 is written back
    is safe even where an output aliases its input.
    """
    splits = tuple(in_regions[0])
    num_blocks = len(leaves) * math.prod(split.blocks for split in splits)
    per_core = pl.cdiv(num_blocks, CORES)
    first = pl.program_id(0) * per_core
    count = jnp.clip(num_blocks - first, 0, per_core)
    if active is not None:
        count = jnp.where(active, count, 0)
    first_inputs, first_outputs = leaves[0]

    def window(step):
        """(leaf, the block's position per dim): its index unravelled over
        the leaves and the region's blocks."""
        index, positions = first + step, []
        for split in reversed(splits):
            index, position = _divmod(index, split.blocks)
            positions.insert(0, position)
        return index, tuple(positions)

    def slot_of(step):
        # lax.rem takes one int width: the literal in the step's (int32 under
        # x64 too).
        return jax.lax.rem(step, jnp.asarray(SLOTS, step.dtype))

    def scoped(in_buffers, out_buffers, in_sems, out_sems):
        def copies(refs, positions, slot, inbound):
            buffers, sems, array_regions = (
                (in_buffers, in_sems, in_regions)
                if inbound
                else (out_buffers, out_sems, out_regions)
            )
            result = []
            for i, (ref, buf, region) in enumerate(
                zip(refs, buffers, array_regions, strict=True)
            ):
                window_ref = ref.at[region.slices(positions)]
                ends = (
                    (window_ref, buf.at[slot])
                    if inbound
                    else (buf.at[slot], window_ref)
                )
                # Indices as int32: Mosaic slices by i32 (a Python int is
                # i64 under x64).
                semaphore = sems.at[np.int32(i), slot]
                result.append(pltpu.make_async_copy(*ends, semaphore))
            return result

        def start(step, slot, inbound):
            """Starts the block's copies from (or to) its own leaf's refs."""
            leaf, positions = window(step)
            for j, (inputs, outputs) in enumerate(leaves):
                refs = inputs if inbound else outputs
                _start_if(leaf == j, copies(refs, positions, slot, inbound))

        def wait(step, slot, inbound):
            """Waits by semaphore and size, which every leaf's block shares."""
            _, positions = window(step)
            refs = first_inputs if inbound else first_outputs
            for copy in copies(refs, positions, slot, inbound):
                copy.wait()

        @pl.when(count > 0)
        def _():
            start(0, np.int32(0), inbound=True)

        def iteration(step, carry):
            slot = slot_of(step)

            @pl.when(step + 1 < count)
            def _():
                start(step + 1, 1 - slot, inbound=True)

            wait(step, slot, inbound=True)

            @pl.when(step >= SLOTS)  # This slot's previous block is written back.
            def _():
                wait(step - SLOTS, slot, inbound=False)

            rounding = {}
            if streams is not None:
                leaf, positions = window(step)
                rounding = streams.for_block(leaf, in_regions[0].slices(positions))
            body(*(buf.at[slot] for buf in (*in_buffers, *out_buffers)), **rounding)
            start(step, slot, inbound=False)
            return carry

        def drain(step):
            @pl.when(step >= 0)
            def _():
                wait(step, slot_of(step), inbound=False)

        jax.lax.fori_loop(0, count, iteration, 0)
        for step in range(SLOTS, 0, -1):  # The writes still in flight.
            drain(count - step)

    pl.run_scoped(
        scoped,
        [
            pltpu.VMEM((SLOTS, *region.block), ref.dtype)
            for ref, region in zip(first_inputs, in_regions, strict=True)
        ],
        [
            pltpu.VMEM((SLOTS, *region.block), ref.dtype)
            for ref, region in zip(first_outputs, out_regions, strict=True)
        ],
        pltpu.SemaphoreType.DMA((len(first_inputs), SLOTS)),
        pltpu.SemaphoreType.DMA((len(first_outputs), SLOTS)),
    )


def _start_if(condition, copies):
    @pl.when(condition)
    def _():
        for copy in copies:
            copy.start()
