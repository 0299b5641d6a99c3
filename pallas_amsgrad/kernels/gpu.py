"""The GPU step: a kernel launch per leaf, in place.

A Mosaic GPU kernel takes `LEAVES_PER_LAUNCH` leaves of a dtype group, left
in GMEM, cut into (block_rows, 128) blocks (`segments`: each leaf's whole
blocks, then any tail). Two kernels walk them:

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

Layers read top-down: `amsgrad_gpu_group` (launches) -> `_launch` (views,
refs, `pl.kernel`) -> `_pipelined_kernel` (a `_ring` per segment: SMEM slots,
TMA in, the body, TMA out) or `_group_kernel` (SMEM buffers) ->
`_blocks_of_height` (one branch per block height: TMA in from the block's
leaf, the body, TMA out).
"""

from __future__ import annotations

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

from pallas_amsgrad import _math, _rounding
from pallas_amsgrad.kernels import common

GRID_AXIS = "blocks"
WARPGROUP_THREADS = 128
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
    """Consecutive CUDA blocks that each take `rows` rows of leaf `leaf`:
    its whole blocks, or the tail rows that a block size leaves over."""

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
      block_rows: rows of 128 lanes per CUDA block.
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
    return [
        leaf_outputs
        for start in range(0, len(leaves), LEAVES_PER_LAUNCH)
        for leaf_outputs in _launch(
            coefficients,
            [tuple(leaf) for leaf in leaves[start : start + LEAVES_PER_LAUNCH]],
            out_dtypes=tuple(out_dtypes),
            block_rows=block_rows,
            operands=operands,
            table=None
            if table is None
            else table[
                _rounding.TABLE_WIDTH * start : _rounding.TABLE_WIDTH
                * (start + LEAVES_PER_LAUNCH)
            ],
            shard_runs=None
            if whole_shapes is None
            else tuple(
                _rounding.runs(leaf[0].shape, whole)
                for leaf, whole in zip(
                    leaves[start : start + LEAVES_PER_LAUNCH],
                    whole_shapes[start : start + LEAVES_PER_LAUNCH],
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
    shapes = [leaf[0].shape for leaf in leaves]
    views = [tuple(map(common.as_rows, leaf)) for leaf in leaves]
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
    new_outputs = [
        common.out_type(
            views[j // per_leaf_out][0].shape,
            out_dtypes[j % per_leaf_out],
            [*views[j // per_leaf_out], coefficients],
        )
        for j in range(per_leaf_out * len(views))
        if j not in output_of_input
    ]
    plan = segments([leaf[0].shape[0] for leaf in views], block_rows)
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
        options = dict(
            per_leaf=(per_leaf_in, per_leaf_out),
            operands=operands,
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
                in_refs,
                out_refs,
                plan=plan,
                grid=grid,
                max_stages=schedule.max_stages,
                **options,
            )
        else:
            _group_kernel(
                coefficients_ref,
                table_ref,
                in_refs,
                out_refs,
                plan=plan,
                block_rows=min(block_rows, max(leaf[0].shape[0] for leaf in views)),
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
            sum(math.prod(s) for s in shapes),
            [a.dtype for a in views[0]],
            out_dtypes,
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
            common.from_rows(out, shape)
            for out in flat[per_leaf_out * k : per_leaf_out * (k + 1)]
        )
        for k, shape in enumerate(shapes)
    ]


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
    block_rows: int, dtypes: Sequence[jnp.dtype], max_stages: int | None = None
) -> int:
    """The pipelined kernel's ring stages for blocks of `block_rows` rows of
    arrays of `dtypes` (every input and output): as many as fit shared
    memory, up to `max_stages` (`MAX_STAGES`), at least one."""
    per_stage = common.on_chip_bytes(block_rows, dtypes, "cuda")
    limit = MAX_STAGES if max_stages is None else max_stages
    return max(1, min(limit, common.GPU_SMEM_BYTES // per_stage))


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
    in_refs,
    out_refs,
    *,
    plan,
    grid,
    max_stages,
    per_leaf,
    operands,
    shard_runs,
    interpret,
    skippable,
):
    """CUDA block `b` of `grid` runs the blocks `g` of the plan with
    `g % grid == b`: a `_ring` per segment, in turn (none, if `skippable`,
    on a step the finite guard rejects). Where the group rounds
    stochastically, `table_ref` holds the leaves' stream keys and bases and
    `shard_runs` places each leaf in its whole leaf."""
    per_leaf_in, per_leaf_out = per_leaf
    cta = jax.lax.axis_index(GRID_AXIS)
    body = _body(coefficients_ref, operands, interpret)
    dtypes = [r.dtype for r in in_refs[:per_leaf_in]] + [
        r.dtype for r in out_refs[:per_leaf_out]
    ]

    def run():
        for segment in plan:
            k = segment.leaf
            streams = None
            if table_ref is not None:
                keys, base = common.table_row(table_ref, k)
                layout = (
                    None
                    if interpret
                    else functools.partial(_strided, (segment.rows, common.LANES))
                )
                streams = (keys, base, shard_runs[k], layout)
            first, steps = share(segment, cta, grid)
            _ring(
                in_refs[per_leaf_in * k : per_leaf_in * (k + 1)],
                out_refs[per_leaf_out * k : per_leaf_out * (k + 1)],
                segment,
                first=first,
                steps=steps,
                stride=grid,
                stages=min(
                    ring_stages(segment.rows, dtypes, max_stages),
                    -(-segment.blocks // grid),
                ),
                body=body,
                streams=streams,
            )

    if skippable:
        accept = common.accepts(coefficients_ref)
        pl.when(accept)(run)
    else:
        run()


def _ring(ins, outs, segment, *, first, steps, stride, stages, body, streams):
    """Blocks `first`, `first + stride`, ... (`steps` of them) of `segment`,
    of one leaf's `ins` and `outs`, through `stages` SMEM slots of each.

    Iteration `i` copies block `i` in (slot `i % stages`, its own barrier,
    which every input's copy arrives at) and computes block
    `i - (stages - 1)`: the `stages - 1` blocks after the one computed are
    in flight. Before the body writes a slot's outputs, the copies out of that
    slot `stages` blocks before have read it. One copy site per array, so
    Mosaic GPU compiles as many TMA copies as the per-block kernel. With
    `streams` (the leaf's keys, base, shard runs and iota layout), the body
    rounds stochastically.
    """
    rows = segment.rows

    def window(step):
        block = first + step * stride
        return segment.row_start + block * rows

    def scoped(in_slots, out_slots, barriers):
        def fetch(step):
            slot = jax.lax.rem(step, stages)
            here = pl.ds(window(step), rows)
            for ref, buf in zip(ins, in_slots, strict=True):
                plgpu.copy_gmem_to_smem(ref.at[here], buf.at[slot], barriers.at[slot])

        def compute(step):
            slot = jax.lax.rem(step, stages)
            first_row = window(step)
            plgpu.barrier_wait(barriers.at[slot])
            # The copies out of this slot `stages` blocks before are done
            # reading it: at most the `stages - 1` since are in flight.
            plgpu.wait_smem_to_gmem(stages - 1, wait_read_only=True)
            rounding = {}
            if streams is not None:
                keys, base, runs, layout = streams
                rounding = dict(
                    keys=keys,
                    index=lambda: common.rows_index(
                        base, first_row, (rows, common.LANES), runs, layout
                    ),
                )
            body(
                *(buf.at[slot] for buf in in_slots),
                *(buf.at[slot] for buf in out_slots),
                **rounding,
            )
            plgpu.commit_smem()
            here = pl.ds(first_row, rows)
            for buf, ref in zip(out_slots, outs, strict=True):
                plgpu.copy_smem_to_gmem(buf.at[slot], ref.at[here], commit_group=False)
            plgpu.commit_smem_to_gmem_group()

        def iteration(i, carry):
            pl.when(i < steps)(lambda: fetch(i))
            pl.when(i >= stages - 1)(lambda: compute(i - (stages - 1)))
            return carry

        jax.lax.fori_loop(0, steps + (stages - 1), iteration, 0)
        plgpu.wait_smem_to_gmem(0)

    lanes = common.LANES
    pl.run_scoped(
        scoped,
        [plgpu.SMEM((stages, rows, lanes), r.dtype) for r in ins],
        [plgpu.SMEM((stages, rows, lanes), r.dtype) for r in outs],
        plgpu.Barrier(num_arrivals=len(ins), num_barriers=stages),
    )


def _group_kernel(
    coefficients_ref,
    table_ref,
    in_refs,
    out_refs,
    *,
    plan,
    block_rows,
    per_leaf,
    operands,
    shard_runs,
    interpret,
    skippable,
):
    """Runs the one segment this CUDA block belongs to (none, if
    `skippable`, on a step the finite guard rejects). Where the group rounds
    stochastically, `table_ref` holds the leaves' stream keys and bases and
    `shard_runs` places each leaf in its whole leaf."""
    per_leaf_in, per_leaf_out = per_leaf
    block = jax.lax.axis_index(GRID_AXIS)
    active = True
    if skippable:
        active = common.accepts(coefficients_ref)
    body = _body(coefficients_ref, operands, interpret)

    def leaf_refs(k):
        return (
            in_refs[per_leaf_in * k : per_leaf_in * (k + 1)],
            out_refs[per_leaf_out * k : per_leaf_out * (k + 1)],
        )

    def scoped(in_buffers, out_buffers, barriers):
        # One body per block height (whole blocks, and each distinct tail),
        # however many leaves: the segments differ only in their TMA copies.
        for height in sorted({segment.rows for segment in plan}):
            _blocks_of_height(
                [(s, *leaf_refs(s.leaf)) for s in plan if s.rows == height],
                block,
                active,
                body,
                [buf.at[:height] for buf in in_buffers],
                [buf.at[:height] for buf in out_buffers],
                barriers,
                None
                if table_ref is None
                else functools.partial(
                    _block_streams,
                    table_ref,
                    shard_runs,
                    layout=None
                    if interpret
                    else functools.partial(_strided, (height, lanes)),
                ),
            )

    lanes = common.LANES
    pl.run_scoped(
        scoped,
        [plgpu.SMEM((block_rows, lanes), r.dtype) for r in in_refs[:per_leaf_in]],
        [plgpu.SMEM((block_rows, lanes), r.dtype) for r in out_refs[:per_leaf_out]],
        plgpu.Barrier(num_barriers=per_leaf_in),
    )


def _blocks_of_height(
    members,
    block,
    active,
    body,
    in_buffers,
    out_buffers,
    barriers,
    streams=None,
):
    """If this CUDA block is in one of the segments (all of one height; each
    with its leaf's input and output refs) and `active`: its leaf's inputs in
    by TMA at once, the body, its outputs out by TMA. With `streams`
    (`_block_streams` with its table, runs and layout bound), the body rounds
    stochastically."""
    inside = [
        (block >= s.first_block) & (block < s.first_block + s.blocks)
        for s, _, _ in members
    ]
    windows = [
        pl.ds(s.row_start + (block - s.first_block) * s.rows, s.rows)
        for s, _, _ in members
    ]

    @pl.when(functools.reduce(operator.or_, inside) & active)
    def _():
        for here, rows, (_, inputs, _) in zip(inside, windows, members, strict=True):
            _copy_in_if(here, inputs, rows, in_buffers, barriers)
        for i in range(len(in_buffers)):
            plgpu.barrier_wait(barriers.at[i])
        rounding = {}
        if streams is not None:
            rounding = streams(members, inside, windows)
        body(*in_buffers, *out_buffers, **rounding)
        plgpu.commit_smem()
        for here, rows, (_, _, outputs) in zip(inside, windows, members, strict=True):
            _copy_out_if(here, out_buffers, outputs, rows)
        plgpu.wait_smem_to_gmem(0)


def _block_streams(table_ref, shard_runs, members, inside, windows, layout) -> dict:
    """The body's `keys` and `index` for this CUDA block: those of the one
    segment it is `inside`, its elements' iota placed in `layout`."""

    def of_mine(values):
        if len(values) == 1:  # The block is inside the one segment.
            return values[0]
        return functools.reduce(
            operator.add,
            (jnp.where(here, v, 0) for here, v in zip(inside, values, strict=True)),
        )

    leaves = [s.leaf for s, _, _ in members]
    # A static leaf where every segment has the same: a scalar load at a
    # constant offset.
    leaf = leaves[0] if len(set(leaves)) == 1 else of_mine(leaves)
    keys, base = common.table_row(table_ref, leaf)
    first_row = of_mine([rows.start for rows in windows])
    shape = (members[0][0].rows, common.LANES)
    member_runs = [shard_runs[k] for k in leaves]

    def index():
        if len(set(member_runs)) == 1:
            return common.rows_index(base, first_row, shape, member_runs[0], layout)
        return of_mine(
            [
                common.rows_index(base, first_row, shape, runs, layout)
                for runs in member_runs
            ]
        )

    return dict(keys=keys, index=index)


def _strided(shape, positions):
    """`positions` laid out as `_load` lays out a block of `shape`."""
    return plgpu.layout_cast(positions, _strided_layout(shape))


def _copy_in_if(condition, inputs, rows, buffers, barriers):
    @pl.when(condition)
    def _():
        for i, (ref, buf) in enumerate(zip(inputs, buffers, strict=True)):
            plgpu.copy_gmem_to_smem(ref.at[rows], buf, barriers.at[i])


def _copy_out_if(condition, buffers, outputs, rows):
    @pl.when(condition)
    def _():
        for buf, ref in zip(buffers, outputs, strict=True):
            plgpu.copy_smem_to_gmem(buf, ref.at[rows])


def _body(coefficients_ref, operands, interpret):
    """`common.amsgrad_kernel` on a block's SMEM buffers."""
    return functools.partial(
        common.amsgrad_kernel,
        coefficients_ref,
        operands=operands,
        # jax 0.10's Mosaic GPU interpreter has no `plgpu.load`.
        load=common.load if interpret else _load,
        sqrt=_math.sqrt_via_rsqrt,
    )


def _load(ref):
    """Loads every block in one register layout, whatever its dtype.

    Mosaic GPU picks a layout per dtype by default, and cannot then add a
    bfloat16 parameter widened to float32 to a float32 update. The layout
    spreads the block over a warpgroup's 128 threads, `vec_size` elements
    each, so it must divide: a block of one row (a leaf of up to 128
    elements) or an odd number of rows takes one element per thread.
    """
    layout = _strided_layout(ref.shape)
    if _LOAD_NEEDS_INDEX:
        return plgpu.load(ref, (), layout=layout)
    return plgpu.load(ref, layout=layout)


def _strided_layout(shape):
    rows, lanes = shape
    vec_size = 2 if rows * lanes % (2 * WARPGROUP_THREADS) == 0 else 1
    return plgpu.Layout.WG_STRIDED(tuple(shape), vec_size=vec_size)
