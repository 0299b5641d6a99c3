"""The GPU step: a kernel launch per leaf, in place.

A Mosaic GPU kernel takes `LEAVES_PER_LAUNCH` leaves of a dtype group, left
in GMEM, viewed as (rows, 128) and cut into (block_rows, 128) blocks
(`segments`: each leaf's whole blocks, then any tail). Two kernels walk them:

- pipelined (`PIPELINED`, the default): a persistent grid of about one CUDA
  block per SM (`persistent_ctas`); CUDA block `b` takes every block `g` of
  the plan with `g % grid == b`, segment by segment, through a ring of up to
  `MAX_STAGES` stages in SMEM (`_ring`): TMA copies of the next blocks are in
  flight while it runs `common.amsgrad_kernel` on one and copies the results
  of the ones before out.
- per block: one CUDA block per block of every leaf, each copying its block
  in by TMA, running the body and copying the results out, with no overlap
  inside a CUDA block (kept for comparison).

The leaves written in place are passed as `jax.Ref`s, which `pl.kernel`
aliases to its outputs.

With 8-bit state (`_quantization`) the arrays but the scales are viewed as
(quantization blocks, block) and a block of the kernel is some whole
quantization blocks; or, where leaf rows end in a shorter quantization
block, flat, a block of the kernel being whole leaf rows, stepped row by
row (`Tiles`). The scales, flat, stay in GMEM: the body reads and writes
its rows'. `_quantized_kernel` decodes, steps and encodes rows of
quantization blocks in a register layout that gives each row's max |x| by
one reduction (`_rows_layout`), with the XLA path's arithmetic.

Layers read top-down: `amsgrad_gpu_group` (launches) -> `_launch` (views,
refs, `pl.kernel`) -> `_pipelined_kernel` (a `_ring` per segment: SMEM slots,
TMA in, the body, TMA out) or `_group_kernel` (SMEM buffers) ->
`_blocks_of_height` (one branch per block height: TMA in from the block's
leaf, the body, TMA out); the body (`_body`) is `common.amsgrad_kernel` or
`_quantized_kernel` (by `_quantized_rows` where flat).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import itertools
import math
import operator
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_amsgrad import _math, _quantization, _rounding
from pallas_amsgrad.kernels import common

GRID_AXIS = "blocks"
WARPGROUP_THREADS = 128
WARP_THREADS = 32
# Elements of flat blocks with 8-bit state (`Tiles`): a TMA bulk copy moves
# whole 16 bytes from 16-byte boundaries, and a copy in (in Lane semantics)
# whole 128 bytes, of 8-bit codes.
COPY_UNIT = 16
READ_UNIT = 128
# Shared memory that a reduction across a warpgroup takes (Mosaic GPU's
# `CompilerParams.reduction_scratch_bytes`): 8-bit state's rows' max |x|.
REDUCTION_SCRATCH_BYTES = 128 * 4 * 4
# Leaves per launch. Mosaic GPU compiles a kernel in time that grows with the
# square of its TMA copies: on an H200 (jax 0.11.2) a launch of 1, 4 and 8
# leaves compiled in 0.3 s, 7.9 s and 29 s, so a launch per leaf compiles a
# tree fastest (benchmarks/results/h200-061bb4c/compile_probe.log).
LEAVES_PER_LAUNCH = 1
# The kernel: the pipelined one (True) or one CUDA block per block (False).
PIPELINED = True
# Most stages of the pipelined kernel's ring: it takes as many as fit
# `common.GPU_SMEM_BYTES` up to this (3 for 16 rows of nine float32 arrays).
MAX_STAGES = 4
# CUDA blocks of the pipelined kernel's grid: None, one per SM of the local
# GPU (`DEFAULT_SMS` where there is none, e.g. exporting from a CPU host).
# Each takes nearly all of an SM's shared memory, so one runs per SM: more
# CUDA blocks than SMs would run in a second wave.
PERSISTENT_CTAS: int | None = None
DEFAULT_SMS = 132  # H100 SXM, H200.


class Schedule(NamedTuple):
    """How launches run, read from the module's settings once per group:
    `pipelined` (`PIPELINED`), the persistent grid's CUDA blocks (`ctas`) and
    the most stages of a ring (`max_stages`)."""

    pipelined: bool
    ctas: int
    max_stages: int

    @classmethod
    def current(cls) -> Schedule:
        return cls(PIPELINED, persistent_ctas(), MAX_STAGES)


# jax 0.10's `plgpu.load(ref, idx)` needs the index; from 0.11 an index is
# deprecated (the ref is indexed instead) and may go.
_LOAD_INDEX = inspect.signature(plgpu.load).parameters.get("idx")
_LOAD_NEEDS_INDEX = (
    _LOAD_INDEX is not None and _LOAD_INDEX.default is inspect.Parameter.empty
)


class Segment(NamedTuple):
    """Consecutive CUDA blocks that each take `rows` rows (of its view:
    `Tiles`) of leaf `leaf`: its whole blocks, or the tail rows that a block
    size leaves over."""

    leaf: int
    first_block: int
    blocks: int
    rows: int
    row_start: int


def segments(leaf_rows: Sequence[int], block_rows: int) -> list[Segment]:
    """The grid's blocks, leaf by leaf: whole blocks, then any tail."""
    result, first = [], 0
    for leaf, rows in enumerate(leaf_rows):
        block = min(block_rows, rows)
        whole, tail = divmod(rows, block)
        result.append(Segment(leaf, first, whole, block, 0))
        first += whole
        if tail:
            result.append(Segment(leaf, first, 1, tail, whole * block))
            first += 1
    return result


def amsgrad_gpu_group(
    coefficients: jax.Array,
    leaves: Sequence[Sequence[jax.Array]],
    *,
    out_dtypes: Sequence[jnp.dtype],
    block_rows: int,
    operands: _math.Operands,
    table: jax.Array | None = None,
    whole_shapes: Sequence[tuple[int, ...]] | None = None,
    interpret: Any = False,
) -> list[tuple[jax.Array, ...]]:
    """Mosaic GPU kernels for leaves sharing dtypes, in place: one launch per
    `LEAVES_PER_LAUNCH` leaves.

    Args:
      coefficients: `_math.Coefficients` packed in the compute dtype.
      leaves: per leaf, its inputs in `operands` order, none empty.
      out_dtypes: dtypes of the outputs written, in `operands` order.
      block_rows: rows of 128 lanes per CUDA block (with 8-bit state, about
        as many elements: `Tiles`).
      operands: the order of each leaf's inputs and outputs.
      table: `dispatch`'s flat stream table (each leaf's four keys and base),
        where the group rounds stochastically.
      whole_shapes: with `table`, the shapes of the whole leaves that the
        leaves are shards of.
      interpret: Mosaic GPU interpreter parameters, to run the kernel on any
        backend. jax 0.10's interpreter does not take `jax.Ref` operands, so
        there every output is a new buffer.

    Returns:
      Per leaf, its outputs in the leaf's shape.
    """
    schedule = Schedule.current()
    # With 8-bit state a launch's blocks are cut to its leaf's shape (`Tiles`).
    per_launch = 1 if operands.quantizes else LEAVES_PER_LAUNCH
    return [
        leaf_outputs
        for start in range(0, len(leaves), per_launch)
        for leaf_outputs in _launch(
            coefficients,
            [tuple(leaf) for leaf in leaves[start : start + per_launch]],
            out_dtypes=tuple(out_dtypes),
            block_rows=block_rows,
            operands=operands,
            table=None
            if table is None
            else table[
                _rounding.TABLE_WIDTH * start : _rounding.TABLE_WIDTH
                * (start + per_launch)
            ],
            shard_runs=None
            if whole_shapes is None
            else tuple(
                _rounding.runs(leaf[0].shape, whole)
                for leaf, whole in zip(
                    leaves[start : start + per_launch],
                    whole_shapes[start : start + per_launch],
                    strict=True,
                )
            ),
            interpret=interpret,
            schedule=schedule,
        )
    ]


# A jit per launch: leaves of one shape and dtypes are traced and lowered
# once, as one function called per leaf (tracing and lowering Mosaic GPU
# kernels is most of a step's lowering time), and compile to one kernel
# (Mosaic GPU caches kernels by the hash of their module).
@functools.partial(
    jax.jit,
    static_argnames=(
        "out_dtypes",
        "block_rows",
        "operands",
        "shard_runs",
        "interpret",
        "schedule",
    ),
)
def _launch(
    coefficients,
    leaves,
    *,
    out_dtypes,
    block_rows,
    operands,
    table,
    shard_runs,
    interpret,
    schedule,
):
    """One Mosaic GPU kernel for the leaves; see `amsgrad_gpu_group`.
    `shard_runs` places each leaf in its whole leaf (`_rounding.runs`) where
    the group rounds stochastically."""
    tiles = Tiles.of(leaves[0][0].shape, block_rows, operands)
    views = [_views(leaf, operands, tiles) for leaf in leaves]
    inputs = list(itertools.chain.from_iterable(views))
    scalars = [coefficients] + ([] if table is None else [table])
    per_leaf_in, per_leaf_out = len(views[0]), len(out_dtypes)
    # {flat input: flat output} of the arrays written back in place.
    aliases = {} if interpret else common.group_aliases(views, out_dtypes, operands)
    # Inside a caller's `shard_map` that checks how values vary, from jax
    # 0.11.2 a Mosaic GPU kernel takes no `jax.Ref` of an array that varies
    # over its manual axes: those outputs are new buffers.
    aliases = {i: o for i, o in aliases.items() if not _varies(inputs[i])}
    in_place = {
        i: jax.new_ref(inputs[i]) for i in aliases
    }  # `pl.kernel` aliases these.
    output_of_input = {out: i for i, out in aliases.items()}
    out_types = [
        common.out_type(_like(view, name, operands).shape, dtype, [*view, coefficients])
        for view in views
        for name, dtype in zip(operands.outputs, out_dtypes, strict=True)
    ]
    new_outputs = [t for j, t in enumerate(out_types) if j not in output_of_input]
    if operands.quantizes:
        _check_quantized_fits(
            leaves[0][0].shape, tiles, operands, views[0], out_types[:per_leaf_out]
        )
    plan = segments([tiles.rows_of(leaf[0].shape) for leaf in leaves], tiles.rows)
    blocks = sum(s.blocks for s in plan)
    grid = min(blocks, schedule.ctas) if schedule.pipelined else blocks

    def kernel(coefficients_ref, *operand_refs):
        table_ref = None
        if table is not None:
            table_ref, *operand_refs = operand_refs
        in_refs = operand_refs[: len(inputs)]
        fresh = iter(operand_refs[len(inputs) :])
        out_refs = [
            in_refs[output_of_input[j]] if j in output_of_input else next(fresh)
            for j in range(per_leaf_out * len(views))
        ]
        leaf_refs = [
            LeafRefs.of(
                in_refs[per_leaf_in * k : per_leaf_in * (k + 1)],
                out_refs[per_leaf_out * k : per_leaf_out * (k + 1)],
                operands,
            )
            for k in range(len(views))
        ]
        options = dict(
            operands=operands,
            tiles=tiles,
            shard_runs=shard_runs,
            interpret=bool(interpret),
            # A skipped step where every output is written in place need not
            # move a byte: the aliased buffers hold what it would write.
            skippable=operands.terms.skip and not new_outputs,
        )
        if schedule.pipelined:
            _pipelined_kernel(
                coefficients_ref,
                table_ref,
                leaf_refs,
                plan=plan,
                grid=grid,
                max_stages=schedule.max_stages,
                **options,
            )
        else:
            _group_kernel(
                coefficients_ref,
                table_ref,
                leaf_refs,
                plan=plan,
                block_rows=min(tiles.rows, max(s.rows for s in plan)),
                **options,
            )

    outputs = pl.kernel(
        kernel,
        out_type=new_outputs,
        mesh=plgpu.Mesh(grid=(grid,), grid_names=(GRID_AXIS,)),
        # Lane semantics: per-thread loads in a strided layout (`_load`). jax
        # 0.11 made Warpgroup the default; 0.10 defaulted to Lane.
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=plgpu.LoweringSemantics.Lane
        ),
        interpret=interpret,
        cost_estimate=common.cost_estimate(  # pragma: no mutate
            sum(leaf[0].size for leaf in leaves),
            [a.dtype for a in views[0]],
            out_dtypes,
            bytes_accessed=sum(
                math.prod(a.shape) * jnp.dtype(a.dtype).itemsize
                for a in (*inputs, *out_types)
            )
            if operands.quantizes
            else None,
        ),
        name="amsgrad_group",  # pragma: no mutate
    )(*scalars, *(in_place.get(i, x) for i, x in enumerate(inputs)))
    fresh = iter(outputs)
    flat = [
        jax.freeze(in_place[output_of_input[j]])
        if j in output_of_input
        else next(fresh)
        for j in range(per_leaf_out * len(views))
    ]
    return [
        tuple(
            common.from_rows(out, _like(leaf, name, operands).shape)
            for name, out in zip(
                operands.outputs,
                flat[per_leaf_out * k : per_leaf_out * (k + 1)],
                strict=True,
            )
        )
        for k, leaf in enumerate(leaves)
    ]


class Tiles(NamedTuple):
    """How a launch's views are cut into blocks of `rows` rows of `width`
    elements.

    (rows, width) views (`flat` False), of 128 lanes or, with 8-bit state, a
    quantization block, are cut along their rows. With 8-bit state and leaf
    rows that end in a shorter block (`flat`), the views are flat, of
    `extent` elements (the leaf's, or more if padded), and a block is
    `rows` leaf rows from a whole `COPY_UNIT`: copied in as a run of whole
    `READ_UNIT`s, which starts at the block or, where that would pass the
    view's end, ends at the view's end (`start`), into a buffer `spill`
    elements longer (`_quantized_rows`); copied out as its own elements,
    rounded up to a `COPY_UNIT` only in a padded view's last block. What a
    copy in reads past its block's rows (of blocks that other CUDA blocks
    may be writing) fills only what the body masks out.
    """

    rows: int
    width: int
    flat: bool = False
    spill: int = 0
    extent: int = 0
    # Copies in promise to stay in bounds (8-bit state): each one bulk copy
    # of a contiguous run, rather than TMA boxes of at most 256 elements a
    # dim (a quantization block may be longer).
    bulk: bool = False

    @classmethod
    def of(cls, shape, block_rows: int, operands: _math.Operands) -> Tiles:
        """The blocks of about `block_rows` rows of 128 lanes of a leaf."""
        elements = block_rows * common.LANES
        if not operands.quantizes:
            return cls(block_rows, common.LANES)
        block, width = operands.block, shape[-1]
        if width % block == 0:
            return cls(max(1, elements // block), block, bulk=True)
        # Rows from whose first a block starts a whole `COPY_UNIT` in.
        unit = COPY_UNIT // math.gcd(width, COPY_UNIT)
        leaf_rows = math.prod(shape) // width
        rows = min(leaf_rows, max(unit, elements // width // unit * unit))
        size = leaf_rows * width
        extent = max(_round_up(size, COPY_UNIT), _round_up(rows * width, READ_UNIT))
        return cls(
            rows, width, flat=True, spill=-width % block, extent=extent, bulk=True
        )

    def rows_of(self, shape) -> int:
        """The rows of a leaf's view (the last one padded, of 128 lanes)."""
        return pl.cdiv(math.prod(shape), self.width)

    def _read(self, rows: int) -> int:
        return _round_up(rows * self.width, READ_UNIT)

    def buffer_shape(self, rows: int) -> tuple[int, ...]:
        """The SMEM buffer of a block of `rows` rows, per array."""
        if not self.flat:
            return (rows, self.width)
        return (_round_up(self._read(rows) + max(self.spill, COPY_UNIT), READ_UNIT),)

    def start(self, first_row, rows: int):
        """Where in the flat view a block's copy in starts."""
        return jnp.minimum(first_row * self.width, self.extent - self._read(rows))

    def offset(self, first_row, rows: int):
        """Where in its buffer the block's first row lies (0 unless flat)."""
        if not self.flat:
            return 0
        return first_row * self.width - self.start(first_row, rows)

    def copy_in(self, ref, buffer, first_row, rows: int):
        """(GMEM window, SMEM buffer part) of a block's copy in."""
        if not self.flat:
            return ref.at[pl.ds(first_row, rows)], buffer.at[:rows]
        read = self._read(rows)
        return ref.at[pl.ds(self.start(first_row, rows), read)], buffer.at[:read]

    def fetch(self, ref, buffer, first_row, rows: int, barrier):
        """Starts a block's copy in, which arrives at `barrier`."""
        src, dst = self.copy_in(ref, buffer, first_row, rows)
        options = {}
        if self.bulk:
            options = dict(oob_mode=plgpu.OOBFillMode.PROMISE_IN_BOUNDS)
        plgpu.copy_gmem_to_smem(src, dst, barrier, **options)

    def copy_out(self, buffer, ref, first_row, rows: int):
        """(SMEM buffer part, GMEM window) of a block's copy out."""
        if not self.flat:
            return buffer.at[:rows], ref.at[pl.ds(first_row, rows)]
        written = _round_up(rows * self.width, COPY_UNIT)
        return (
            buffer.at[pl.ds(self.offset(first_row, rows), written)],
            ref.at[pl.ds(first_row * self.width, written)],
        )


def _round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def _views(leaf, operands: _math.Operands, tiles: Tiles) -> tuple[jax.Array, ...]:
    """A leaf's inputs as the kernel takes them: (rows, 128) views
    (`common.as_rows`); with 8-bit state, (quantization blocks, block) views
    or (`tiles.flat`) flat ones of `tiles.extent` elements, and the scales
    flat: free, but for padding."""
    if not operands.quantizes:
        return tuple(map(common.as_rows, leaf))

    def view(name, x):
        if _is_scales(name):
            return x.reshape(-1)
        if not tiles.flat:
            return x.reshape(-1, tiles.width)
        flat = x.reshape(-1)
        if padding := tiles.extent - flat.size:
            flat = jnp.pad(flat, (0, padding))
        return flat

    return tuple(view(name, x) for name, x in zip(operands.inputs, leaf, strict=True))


def _like(leaf, name: str, operands: _math.Operands):
    """The input of a leaf whose shape the output `name` takes: the input of
    that name, else (the update) the leaf's first."""
    return dict(zip(operands.inputs, leaf, strict=True)).get(name, leaf[0])


def _is_scales(name: str) -> bool:
    return name.endswith("_scales")


def _check_quantized_fits(shape, tiles: Tiles, operands, view, out_types):
    """Raises, naming the leaf's `shape`, where one stage of its blocks
    (every array but the scales) overflows shared memory: leaf rows too
    long to take whole (those that end in a shorter block), or too long a
    quantization block."""
    names = (*operands.inputs, *operands.outputs)
    dtypes = [
        a.dtype
        for name, a in zip(names, (*view, *out_types), strict=True)
        if not _is_scales(name)
    ]
    elements = math.prod(tiles.buffer_shape(tiles.rows))
    needed = common.on_chip_bytes(pl.cdiv(elements, common.LANES), dtypes, "cuda")
    limit = common.GPU_SMEM_BYTES - REDUCTION_SCRATCH_BYTES
    if needed > limit:
        what = (
            f"rows of {tiles.width} elements, which end in a shorter "
            f"quantization block of {operands.block}, are taken whole"
            if tiles.flat
            else f"quantization blocks of {tiles.width} elements"
        )
        raise NotImplementedError(
            f"the cuda kernel does not take 8-bit state of a leaf of shape "
            f"{tuple(shape)} yet: its {what}, {tiles.rows} to a block, which "
            f"needs {needed} bytes of shared memory, more than its {limit}. "
            "Use implementation='xla' or None, which run it as XLA fusions, "
            "or Pallas(platforms=('tpu',)) or ('cpu',) for the TPU kernel or "
            "Pallas' generic interpreter"
        )


class LeafRefs(NamedTuple):
    """One leaf's refs in a kernel: those whose blocks go through SMEM
    (`ins`, `outs`, in `operands` order) and, with 8-bit state, the scales by
    name (`in_scales`, `out_scales`), which the body reads and writes in
    GMEM (4 bytes a quantization block: rarely the whole 128 bytes that a
    copy in takes)."""

    ins: tuple
    outs: tuple
    in_scales: dict
    out_scales: dict

    @classmethod
    def of(cls, in_refs, out_refs, operands: _math.Operands) -> LeafRefs:
        def split(names, refs):
            named = list(zip(names, refs, strict=True))
            return (
                tuple(ref for name, ref in named if not _is_scales(name)),
                {name: ref for name, ref in named if _is_scales(name)},
            )

        ins, in_scales = split(operands.inputs, in_refs)
        outs, out_scales = split(operands.outputs, out_refs)
        return cls(ins, outs, in_scales, out_scales)


def _varies(x) -> bool:
    """Whether `x` varies over the manual mesh axes of a `shard_map`."""
    return bool(getattr(getattr(jax.typeof(x), "mat", None), "varying", ()))


def persistent_ctas() -> int:
    """CUDA blocks of the pipelined kernel's grid (`PERSISTENT_CTAS`)."""
    if PERSISTENT_CTAS is not None:
        return PERSISTENT_CTAS
    for device in jax.local_devices():
        if device.platform == "gpu":
            return getattr(device, "core_count", DEFAULT_SMS)
    return DEFAULT_SMS


def ring_stages(
    block_rows: int,
    dtypes: Sequence[jnp.dtype],
    max_stages: int | None = None,
    reserved: int = 0,
) -> int:
    """The pipelined kernel's ring stages for blocks of `block_rows` rows of
    128 lanes of arrays of `dtypes` (every input and output through SMEM): as
    many as fit shared memory less `reserved` bytes, up to `max_stages`
    (`MAX_STAGES`), at least one."""
    per_stage = common.on_chip_bytes(block_rows, dtypes, "cuda")
    limit = MAX_STAGES if max_stages is None else max_stages
    return max(1, min(limit, (common.GPU_SMEM_BYTES - reserved) // per_stage))


def share(segment: Segment, cta, grid: int):
    """(first, steps): the first of the segment's blocks that CUDA block
    `cta` (an int, or traced) of the pipelined kernel's `grid` takes, and how
    many: blocks `first`, `first + grid`, ... (the plan's blocks `g` with
    `g % grid == cta`)."""
    cta = jnp.asarray(cta)

    def constant(value):  # lax's integer ops take one width (int32 under x64).
        return jnp.asarray(value, cta.dtype)

    first = jax.lax.rem(
        cta + constant(grid - segment.first_block % grid), constant(grid)
    )
    steps = jax.lax.div(constant(segment.blocks + grid - 1) - first, constant(grid))
    return first, steps


def _pipelined_kernel(
    coefficients_ref,
    table_ref,
    leaves,
    *,
    plan,
    grid,
    max_stages,
    operands,
    tiles,
    shard_runs,
    interpret,
    skippable,
):
    """CUDA block `b` of `grid` runs the blocks `g` of the plan with
    `g % grid == b`: a `_ring` per segment, in turn (none, if `skippable`,
    on a step the finite guard rejects). `leaves` are the `LeafRefs`, cut
    as `tiles` say. Where the group rounds stochastically, `table_ref` holds
    the leaves' stream keys and bases and `shard_runs` places each leaf in
    its whole leaf."""
    cta = jax.lax.axis_index(GRID_AXIS)
    body = _body(coefficients_ref, operands, tiles, interpret)
    dtypes = [r.dtype for r in (*leaves[0].ins, *leaves[0].outs)]
    reserved = REDUCTION_SCRATCH_BYTES if operands.quantizes else 0

    def run():
        for segment in plan:
            k = segment.leaf
            streams = None
            if table_ref is not None:
                keys, base = common.table_row(table_ref, k)
                streams = (keys, base, shard_runs[k])
            first, steps = share(segment, cta, grid)
            elements = math.prod(tiles.buffer_shape(segment.rows))
            stages = ring_stages(
                pl.cdiv(elements, common.LANES), dtypes, max_stages, reserved
            )
            _ring(
                leaves[k],
                segment,
                tiles,
                first=first,
                steps=steps,
                stride=grid,
                stages=min(stages, -(-segment.blocks // grid)),
                body=body,
                streams=streams,
            )

    if skippable:
        accept = common.accepts(coefficients_ref)
        pl.when(accept)(run)
    else:
        run()


def _ring(leaf, segment, tiles, *, first, steps, stride, stages, body, streams):
    """Blocks `first`, `first + stride`, ... (`steps` of them) of `segment`,
    of one leaf's arrays through SMEM (`leaf.ins`, `leaf.outs`, cut as
    `tiles` say), through `stages` SMEM slots of each.

    Iteration `i` copies block `i` in (slot `i % stages`, its own barrier,
    which every input's copy arrives at) and computes block
    `i - (stages - 1)`: the `stages - 1` blocks after the one computed are
    in flight. Before the body writes a slot's outputs, the copies out of that
    slot `stages` blocks before have read it. One copy site per array, so
    Mosaic GPU compiles as many TMA copies as the per-block kernel. With
    `streams` (the leaf's keys, base and shard runs), the body rounds
    stochastically.
    """
    ins, outs = leaf.ins, leaf.outs
    rows = segment.rows

    def window(step):
        block = first + step * stride
        return segment.row_start + block * rows

    def scoped(in_slots, out_slots, barriers):
        def slot_of(step):  # lax's integer ops take one width (int32 under x64).
            return jax.lax.rem(step, jnp.asarray(stages, step.dtype))

        def fetch(step):
            slot = slot_of(step)
            for ref, buf in zip(ins, in_slots, strict=True):
                tiles.fetch(ref, buf.at[slot], window(step), rows, barriers.at[slot])

        def compute(step):
            slot = slot_of(step)
            first_row = window(step)
            plgpu.barrier_wait(barriers.at[slot])
            # The copies out of this slot `stages` blocks before are done
            # reading it: at most the `stages - 1` since are in flight.
            plgpu.wait_smem_to_gmem(stages - 1, wait_read_only=True)
            rounding = {}
            if streams is not None:
                keys, base, runs = streams
                rounding = dict(
                    keys=keys, index=functools.partial(_tile_index, base, runs)
                )
            body(
                leaf,
                first_row,
                rows,
                tiles.offset(first_row, rows),
                [buf.at[slot] for buf in in_slots],
                [buf.at[slot] for buf in out_slots],
                **rounding,
            )
            plgpu.commit_smem()
            for buf, ref in zip(out_slots, outs, strict=True):
                plgpu.copy_smem_to_gmem(
                    *tiles.copy_out(buf.at[slot], ref, first_row, rows),
                    commit_group=False,
                )
            plgpu.commit_smem_to_gmem_group()

        def iteration(i, carry):
            pl.when(i < steps)(lambda: fetch(i))
            pl.when(i >= stages - 1)(lambda: compute(i - (stages - 1)))
            return carry

        jax.lax.fori_loop(0, steps + (stages - 1), iteration, 0)
        plgpu.wait_smem_to_gmem(0)

    shape = tiles.buffer_shape(rows)
    pl.run_scoped(
        scoped,
        [plgpu.SMEM((stages, *shape), r.dtype) for r in ins],
        [plgpu.SMEM((stages, *shape), r.dtype) for r in outs],
        plgpu.Barrier(num_arrivals=len(ins), num_barriers=stages),
    )


def _group_kernel(
    coefficients_ref,
    table_ref,
    leaves,
    *,
    plan,
    block_rows,
    operands,
    tiles,
    shard_runs,
    interpret,
    skippable,
):
    """Runs the one segment this CUDA block belongs to (none, if
    `skippable`, on a step the finite guard rejects). `leaves` are the
    `LeafRefs`, cut as `tiles` say. Where the group rounds stochastically,
    `table_ref` holds the leaves' stream keys and bases and `shard_runs`
    places each leaf in its whole leaf."""
    block = jax.lax.axis_index(GRID_AXIS)
    active = True
    if skippable:
        active = common.accepts(coefficients_ref)
    body = _body(coefficients_ref, operands, tiles, interpret)
    # One body per block height (whole blocks, and each distinct tail),
    # however many leaves: the segments differ only in their TMA copies.
    # With 8-bit state, one per leaf too: the body reads the leaf's scales.
    kinds = {}
    for segment in plan:
        kind = (segment.rows, segment.leaf if operands.quantizes else 0)
        kinds.setdefault(kind, []).append(segment)

    def scoped(in_buffers, out_buffers, barriers):
        for (height, _), members in sorted(kinds.items()):
            # Flat buffers are whole for the body, which finds the rows.
            ins, outs = (
                [buf if tiles.flat else buf.at[:height] for buf in buffers]
                for buffers in (in_buffers, out_buffers)
            )
            _blocks_of_height(
                [(s, leaves[s.leaf]) for s in members],
                tiles,
                block,
                active,
                body,
                ins,
                outs,
                barriers,
                None
                if table_ref is None
                else functools.partial(_block_streams, table_ref, shard_runs),
            )

    shape = tiles.buffer_shape(block_rows)
    pl.run_scoped(
        scoped,
        [plgpu.SMEM(shape, r.dtype) for r in leaves[0].ins],
        [plgpu.SMEM(shape, r.dtype) for r in leaves[0].outs],
        plgpu.Barrier(num_barriers=len(leaves[0].ins)),
    )


def _blocks_of_height(
    members,
    tiles,
    block,
    active,
    body,
    in_buffers,
    out_buffers,
    barriers,
    streams=None,
):
    """If this CUDA block is in one of the segments (all of one height; each
    with its leaf's `LeafRefs`) and `active`: its leaf's inputs in by TMA at
    once, the body, its outputs out by TMA. With `streams` (`_block_streams`
    with its table and runs bound), the body rounds stochastically."""
    height = members[0][0].rows
    inside = [
        (block >= s.first_block) & (block < s.first_block + s.blocks)
        for s, _ in members
    ]
    first_rows = [s.row_start + (block - s.first_block) * s.rows for s, _ in members]

    @pl.when(functools.reduce(operator.or_, inside) & active)
    def _():
        for here, first, (_, leaf) in zip(inside, first_rows, members, strict=True):
            _copy_in_if(here, tiles, leaf.ins, first, height, in_buffers, barriers)
        for i in range(len(in_buffers)):
            plgpu.barrier_wait(barriers.at[i])
        rounding = {}
        if streams is not None:
            rounding = streams(members, inside)
        # The leaf is `_quantized_kernel`'s, for its scales: `_group_kernel`
        # gives it segments of one leaf.
        first_row = _of_mine(inside, first_rows)
        offset = tiles.offset(first_row, height)
        body(
            members[0][1],
            first_row,
            height,
            offset,
            in_buffers,
            out_buffers,
            **rounding,
        )
        plgpu.commit_smem()
        for here, first, (_, leaf) in zip(inside, first_rows, members, strict=True):
            _copy_out_if(here, tiles, out_buffers, leaf.outs, first, height)
        plgpu.wait_smem_to_gmem(0)


def _of_mine(inside, values):
    """Of one value per segment, that of the one segment the CUDA block is
    `inside`."""
    if len(values) == 1:  # The block is inside the one segment.
        return values[0]
    return functools.reduce(
        operator.add,
        (jnp.where(here, v, 0) for here, v in zip(inside, values, strict=True)),
    )


def _block_streams(table_ref, shard_runs, members, inside) -> dict:
    """The body's `keys` and `index` for this CUDA block: those of the one
    segment it is `inside`."""
    leaves = [s.leaf for s, _ in members]
    # A static leaf where every segment has the same: a scalar load at a
    # constant offset.
    leaf = leaves[0] if len(set(leaves)) == 1 else _of_mine(inside, leaves)
    keys, base = common.table_row(table_ref, leaf)
    member_runs = [shard_runs[k] for k in leaves]

    def index(start, shape, layout):
        if len(set(member_runs)) == 1:
            return _tile_index(base, member_runs[0], start, shape, layout)
        return _of_mine(
            inside,
            [_tile_index(base, runs, start, shape, layout) for runs in member_runs],
        )

    return dict(keys=keys, index=index)


def _tile_index(base, shard_runs, start, shape, layout=None) -> jax.Array:
    """The flat index in the whole leaf of each element of a (rows, width)
    array of a shard's consecutive elements from its flat index `start`,
    the shard lying in its leaf as `shard_runs` (`_rounding.runs`) say from
    the leaf's flat index `base`; `layout` places the iota
    (`common.iota`)."""
    rows, cols = (common.iota(shape, d, layout) for d in range(2))
    local = jnp.asarray(start, jnp.uint32) + rows * jnp.uint32(shape[1]) + cols
    return jnp.asarray(base, jnp.uint32) + _rounding.whole_offset(local, shard_runs)


def _copy_in_if(condition, tiles, inputs, first_row, rows, buffers, barriers):
    @pl.when(condition)
    def _():
        for i, (ref, buf) in enumerate(zip(inputs, buffers, strict=True)):
            tiles.fetch(ref, buf, first_row, rows, barriers.at[i])


def _copy_out_if(condition, tiles, buffers, outputs, first_row, rows):
    @pl.when(condition)
    def _():
        for buf, ref in zip(buffers, outputs, strict=True):
            plgpu.copy_smem_to_gmem(*tiles.copy_out(buf, ref, first_row, rows))


def _body(coefficients_ref, operands, tiles, interpret):
    """The body on a block's SMEM buffers (`in_buffers`, `out_buffers`) of
    `rows` rows from `first_row` of a leaf (its `LeafRefs`), cut as `tiles`
    say (where flat, the first row `offset` elements in):
    `common.amsgrad_kernel`, or with 8-bit state `_quantized_kernel` on the
    block, or row by row (`_quantized_rows`). With `keys` and `index`
    (`_tile_index` with its base and runs bound), it rounds stochastically."""
    # jax 0.10's Mosaic GPU interpreter has no `plgpu.load` or layouts.
    choose = (lambda _: None) if interpret else (lambda layout: layout)

    def run(
        leaf, first_row, rows, offset, in_buffers, out_buffers, keys=None, index=None
    ):
        def rounding(start, shape, layout):
            if keys is None:
                return {}
            return dict(keys=keys, index=lambda: index(start, shape, _cast_to(layout)))

        shape = (rows, tiles.width)
        if not operands.quantizes:
            layout = choose(_strided_layout(shape))
            return common.amsgrad_kernel(
                coefficients_ref,
                *in_buffers,
                *out_buffers,
                operands=operands,
                load=common.load if layout is None else _loader(layout),
                sqrt=_math.sqrt_via_rsqrt,
                **rounding(first_row * tiles.width, shape, layout),
            )
        if not tiles.flat:
            layout = choose(_rows_layout(tiles.width))
            return _quantized_kernel(
                coefficients_ref,
                leaf,
                first_row,
                in_buffers,
                out_buffers,
                operands=operands,
                layout=layout,
                **rounding(first_row * tiles.width, shape, layout),
            )
        _quantized_rows(
            coefficients_ref,
            leaf,
            first_row,
            rows,
            offset,
            in_buffers,
            out_buffers,
            operands=operands,
            tiles=tiles,
            choose=choose,
            rounding=rounding,
        )

    return run


def _quantized_rows(
    coefficients_ref,
    leaf,
    first_row,
    rows,
    offset,
    in_buffers,
    out_buffers,
    *,
    operands,
    tiles,
    choose,
    rounding,
):
    """`_quantized_kernel` on each of a flat block's `rows` leaf rows (the
    first `offset` elements into the buffers), as its quantization blocks:
    the row's `tiles.width` elements and as many after them as make its
    shorter last block a whole one (`tiles.spill`), masked out of that
    block's scale. What it writes there is the next row's first block,
    which that row writes after (every store is behind a warpgroup barrier),
    or past the block's rows."""
    width, block = tiles.width, operands.block
    shape = (pl.cdiv(width, block), block)
    # Rows of odd length start at odd elements: one element per load.
    layout = choose(_rows_layout(block, vec_size=2 if width % 2 == 0 else 1))

    def row(r, carry):
        window = pl.ds(offset + r * width, math.prod(shape))

        def view(buf):
            # jax 0.10's Mosaic GPU interpreter reshapes no refs: the body
            # reshapes the values.
            return buf.at[window] if layout is None else buf.at[window].reshape(*shape)

        here = first_row + r
        _quantized_kernel(
            coefficients_ref,
            leaf,
            here * shape[0],
            [view(buf) for buf in in_buffers],
            [view(buf) for buf in out_buffers],
            operands=operands,
            layout=layout,
            shape=shape,
            length=width,
            **rounding(here * width, shape, layout),
        )
        return carry

    jax.lax.fori_loop(0, rows, row, 0)


def _quantized_kernel(
    coefficients_ref,
    leaf,
    first_scale,
    in_refs,
    out_refs,
    *,
    operands,
    layout=None,
    shape=None,
    length=None,
    keys=None,
    index=None,
):
    """The body with 8-bit state: `in_refs` and `out_refs` are SMEM buffers
    of the leaf's arrays but the scales (in `operands` order), each
    (rows, block) (or flat, with that `shape`), a row a quantization block;
    the rows' scales are the leaf's (`leaf`, `LeafRefs`) from
    `first_scale`, in GMEM. With `length`, the rows are one leaf row's
    blocks, `length` elements of them its own.

    Decodes the moments by their rows' scales, runs `step_block` in the
    compute dtype and encodes each new moment by its rows' max |x|, with the
    XLA path's arithmetic (`_quantization`); a skip keeps codes and scales
    bitwise. `layout` (None when interpreted) is `_rows_layout`: every
    array of the block is in it, and a row's scale in its reduction.
    """
    in_refs = dict(
        zip([n for n in operands.inputs if not _is_scales(n)], in_refs, strict=True)
    )
    out_refs = dict(
        zip([n for n in operands.outputs if not _is_scales(n)], out_refs, strict=True)
    )
    if shape is None:
        shape = next(iter(in_refs.values())).shape
    rows = pl.ds(first_scale, shape[0])
    cast = _cast_to(layout)

    def across(field):
        """A row's value (rows,) on each of its elements (rows, block)."""
        spread = jax.lax.broadcast_in_dim(field, shape, (0,))
        return spread if cast is None else cast(spread)

    def load(ref):
        return common.load(ref).reshape(shape)

    load_scales = common.load
    if layout is not None:
        load = _loader(layout)
        # Of a few scales in GMEM: an unoptimized load (no SMEM to stage).
        load_scales = _loader(layout.reduce(1), optimized=False)
    valid = None
    if length is not None:
        positions = [common.iota(shape, d, cast) for d in range(2)]
        valid = positions[0] * jnp.uint32(shape[1]) + positions[1] < length

    inputs, read = [], []  # Scales as exponent fields: per element, per row.
    for name in operands.inputs:
        if _is_scales(name):
            field = _quantization.field_of(load_scales(leaf.in_scales[name].at[rows]))
            inputs.append(across(field))
        else:
            field = load(in_refs[name])
            inputs.append(field)
        read.append(field)

    def quantized(x, cmap, rounding, random):
        field = _row_fields(x, cmap, valid)
        codes = _quantization.encode(x, across(field), cmap, rounding, random)
        return codes, field

    # A skip keeps codes and scales bitwise: a select after the store, not
    # one of decoded values that would then be encoded again.
    applied = operands.decoded().with_terms(
        dataclasses.replace(operands.terms, skip=False)
    )
    dtype = coefficients_ref.dtype
    outputs = _math.step_block(
        _quantization.read_blocks(inputs, operands, dtype),
        _math.Coefficients.unpack(coefficients_ref),
        applied,
        sqrt=_math.sqrt_via_rsqrt,
    )
    out_dtypes = [
        out_refs[name].dtype if name in out_refs else jnp.float32
        for name in operands.outputs
    ]
    stored = _quantization._store(outputs, out_dtypes, operands, keys, index, quantized)
    if operands.terms.skip:
        accept = common.accepts(coefficients_ref)
        # Mosaic GPU selects no 8-bit values: codes are chosen as int32.
        stored = _quantization.unless_accepted(
            [_widened(x) for x in stored], [_widened(x) for x in read], operands, accept
        )
    for name, value in zip(operands.outputs, stored, strict=True):
        if _is_scales(name):
            leaf.out_scales[name][rows] = _quantization.scales_of(value)
        else:
            ref = out_refs[name]
            ref[...] = value.astype(ref.dtype).reshape(ref.shape)


def _widened(x) -> jax.Array:
    """8-bit codes as int32, any other array as it is."""
    return x.astype(jnp.int32) if jnp.dtype(x.dtype).itemsize == 1 else x


def _row_fields(x, cmap, valid=None) -> jax.Array:
    """The exponent field of each row's scale (rows,): `_quantization`'s
    `block_absmax`, with what is not the row's (`valid`) masked out, and
    `scale_field`, the max reduced away (Mosaic GPU keeps no (rows, 1)
    array in the rows' layout)."""
    bits = jnp.minimum(_quantization.magnitude_bits(x), _quantization._INFINITY_BITS)
    if valid is not None:
        bits = jnp.where(valid, bits, 0)
    absmax = jnp.max(jax.lax.bitcast_convert_type(bits, jnp.float32), axis=-1)
    absmax_bits = jax.lax.bitcast_convert_type(absmax, jnp.int32)
    return _quantization.scale_field(absmax_bits, cmap)


def _cast_to(layout):
    """A function placing an array in `layout` (none where it is None)."""
    if layout is None:
        return None
    return functools.partial(plgpu.layout_cast, new_layout=layout)


def _loader(layout, optimized=True):
    """Loads a block in `layout`, whatever its dtype.

    Mosaic GPU picks a layout per dtype by default, and cannot then add a
    bfloat16 parameter widened to float32 to a float32 update.
    """

    def load(ref):
        if _LOAD_NEEDS_INDEX:
            return plgpu.load(ref, (), layout=layout, optimized=optimized)
        return plgpu.load(ref, layout=layout, optimized=optimized)

    return load


def _strided_layout(shape):
    """A (rows, 128) block spread over a warpgroup's 128 threads,
    `vec_size` elements each, so it must divide: a block of one row (a leaf
    of up to 128 elements) or an odd number of rows takes one element per
    thread."""
    rows, lanes = shape
    vec_size = 2 if rows * lanes % (2 * WARPGROUP_THREADS) == 0 else 1
    return plgpu.Layout.WG_STRIDED(tuple(shape), vec_size=vec_size)


def _rows_layout(width, vec_size=2):
    """A layout of (rows, width) blocks, with each row spread over a
    warpgroup's 128 threads, `vec_size` consecutive elements each (one
    8-byte load of float32, where it divides `width / 128`), and the rows
    over each thread's registers: a row's max is one reduction
    (`layout.reduce(1)`)."""
    if width % (vec_size * WARPGROUP_THREADS):
        vec_size = 1
    return plgpu.Layout.TILED(
        plgpu.Tiling(
            ((1, WARPGROUP_THREADS * vec_size), (WARP_THREADS * vec_size,), (vec_size,))
        ),
        warp_dims=(-3,),
        lane_dims=(-2,),
        vector_dim=-1,
    )
