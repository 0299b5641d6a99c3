"""The GPU kernel under Pallas' Mosaic GPU interpreter, with races detected.

`InterpretGPUParams` simulates a GPU on the CPU: GMEM and SMEM buffers, every
CUDA block of the grid, TMA copies and the barriers that track them, and a
happens-before race detector. The kernel runs with the GPU's own block sizes
and grid; results are checked against the spec. Both kernels run: the
pipelined one (the default; here with persistent grids of a few CUDA blocks,
so that each walks several blocks through its ring) and the per-block one.

What jax 0.10's interpreter lacks, and so what this does not cover: it has no
`plgpu.load` (blocks are loaded plainly), cannot fill barriers with NaN (SMEM
starts zeroed) and takes no `jax.Ref` operands (every output is a new buffer;
tests/test_lowering.py checks the compiled kernel's aliases instead), so a
skipped step's early exit, taken only where every output is in place, does
not run here; and it treats `plgpu.wait_smem_to_gmem` as a no-op (a copy out
of SMEM is done when issued), so the pipelined kernel's waits for its slots
are checked only on a GPU (jax 0.11's interpreter tracks copies out, each
copy rather than each group: it waits more, never less).
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import strategies
import tolerances
from hypothesis import given, note, settings
from hypothesis import strategies as st
from implementations import (
    check_against_spec,
    gpu_interpreted,
    optimizer,
    recipe_case,
)
from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call

import amsgrad_spec as spec
from pallas_amsgrad.kernels import common, gpu

pytestmark = pytest.mark.slow

# Rows per CUDA block; small, so that small leaves span several blocks.
GPU_BLOCK_ROWS = [16, 32]
# CUDA blocks of the pipelined kernel's persistent grid: few, so that each
# takes several blocks (None: one per SM, as on a GPU; here, a block each).
PERSISTENT_GRIDS = [1, 2, 3, None]


@contextlib.contextmanager
def gpu_kernel(pipelined=True, ctas=None):
    """Traces the pipelined kernel with a grid of `ctas` CUDA blocks, or the
    per-block kernel, within; the module's settings after."""
    saved = gpu.PIPELINED, gpu.PERSISTENT_CTAS
    gpu.PIPELINED, gpu.PERSISTENT_CTAS = pipelined, ctas
    try:
        yield
    finally:
        gpu.PIPELINED, gpu.PERSISTENT_CTAS = saved


@contextlib.contextmanager
def race_checked():
    """Fails if the GPU interpreter detected a data race in the kernels run."""
    interpret_pallas_call.reset_gpu_interpret_mode_state()
    yield
    races = interpret_pallas_call.get_races()
    assert races is not None, "no kernel ran in the GPU interpreter"
    assert not races.races_found, "the GPU interpreter detected a data race"


@settings(max_examples=2)
@given(data=st.data())
@pytest.mark.parametrize(
    "dtype, mu_dtype",
    strategies.INTERPRETER_DTYPE_PAIRS,
    ids=strategies.INTERPRETER_DTYPE_IDS,
)
def test_gpu_kernel_matches_spec_without_races(dtype, mu_dtype, data):
    params, grads, hp, block_rows = data.draw(
        strategies.interpreter_cases(dtype, mu_dtype, GPU_BLOCK_ROWS)
    )
    ctas = data.draw(st.sampled_from(PERSISTENT_GRIDS), label="persistent grid")
    note(f"{hp=} {block_rows=}")
    with gpu_kernel(ctas=ctas), race_checked():
        check_against_spec(
            gpu_interpreted(block_rows),
            params,
            grads,
            hp,
            max_ulps=tolerances.INTERPRETED_GPU_ULPS,
        )


@pytest.mark.parametrize(
    "pipelined, ctas", [(True, 2), (False, None)], ids=["pipelined", "per-block"]
)
def test_gpu_kernel_on_a_multi_block_tree(pipelined, ctas):
    """One fixed case, fast enough for the mutation-testing selection: leaves
    of three whole blocks, of two blocks and a tail, and under one row; the
    pipelined kernel's two CUDA blocks take three and four of the six."""
    params = {
        "w": jnp.linspace(-1, 1, 48 * common.LANES).reshape(48, common.LANES),
        "v": jnp.linspace(-3, 3, 40 * common.LANES).reshape(40, common.LANES),
        "b": jnp.linspace(-2, 2, 100),
    }
    grads = [
        jax.tree.map(lambda p, s=s: jnp.cos(p * (2 + s)), params) for s in range(2)
    ]
    assert len(gpu.segments([48, 40, 1], 16)) == 4
    with gpu_kernel(pipelined, ctas), race_checked():
        check_against_spec(
            gpu_interpreted(16),
            params,
            grads,
            spec.Hyperparams(0.01, mu_dtype=jnp.float32),
            max_ulps=tolerances.INTERPRETED_GPU_ULPS,
        )


def test_gpu_kernel_runs_the_recipe():
    """Clipping, masked decay and skips on the GPU kernel: a finite step, a
    skipped one (a NaN in an undecayed leaf) and one more, block by block."""
    params, grads, hp = recipe_case(common.LANES)
    # One CUDA block: it walks every block of each leaf.
    with gpu_kernel(ctas=1), race_checked():
        check_against_spec(
            gpu_interpreted(16),
            params,
            grads,
            hp,
            max_ulps=tolerances.INTERPRETED_GPU_ULPS,
        )


@pytest.mark.parametrize(
    "dtype, ctas",
    [(jnp.bfloat16, 2), (jnp.float32, 3)],
    ids=["bfloat16-2", "float32-3"],
)
def test_pipelined_kernel_wraps_its_ring(dtype, ctas):
    """A leaf of ten blocks on two CUDA blocks (five steps each) through rings
    of four stages (bfloat16), or on three (four steps, three and three: not
    a multiple of the grid) through rings of three (float32): a slot used
    again; a leaf of two blocks and a tail, whose blocks go on round the
    grid; and a leaf of one row."""
    params = {
        "w": jnp.linspace(-1, 1, 160 * common.LANES)
        .reshape(160, common.LANES)
        .astype(dtype),
        "v": jnp.linspace(-3, 3, 40 * common.LANES)
        .reshape(40, common.LANES)
        .astype(dtype),
        "b": jnp.linspace(-2, 2, 100).astype(dtype),
    }
    grads = [
        jax.tree.map(lambda p, s=s: jnp.cos(p * (2 + s)).astype(p.dtype), params)
        for s in range(2)
    ]
    arrays = [dtype] * 9
    assert gpu.ring_stages(16, arrays) == {jnp.float32: 3, jnp.bfloat16: 4}[dtype]
    with gpu_kernel(ctas=ctas), race_checked():
        check_against_spec(
            gpu_interpreted(16),
            params,
            grads,
            spec.Hyperparams(0.01),
            max_ulps=tolerances.INTERPRETED_GPU_ULPS,
        )


def test_pipelined_kernel_rounds_with_the_xla_paths_bits():
    """Stochastic rounding on CUDA blocks that walk several blocks: each
    block's elements are numbered from its first row in the whole leaf, so
    the bits are the XLA path's (a bfloat16 leaf of five blocks, a float32
    leaf, rounding its float16 nu, of five blocks and a tail)."""
    params = {
        "w": jnp.linspace(-1, 1, 80 * common.LANES)
        .reshape(80, common.LANES)
        .astype(jnp.bfloat16),
        "wide": jnp.linspace(-1, 1, 40 * 300).reshape(40, 300),
        "b": jnp.linspace(-2, 2, 100).astype(jnp.bfloat16),
    }
    hp = spec.Hyperparams(
        0.01, nu_dtype=jnp.float16, stochastic_rounding=True, seed=2**31 + 5
    )

    def two_steps(implementation):
        opt = optimizer(hp, implementation)
        state, step, tree = opt.init(params), jax.jit(opt.step), params
        for s in range(2):
            grads = jax.tree.map(
                lambda p, s=s: jnp.cos(p * (2 + s)).astype(p.dtype), tree
            )
            tree, state = step(grads, state, tree)
        return tree, state

    with gpu_kernel(ctas=2), race_checked():
        kernel = two_steps(gpu_interpreted(16))
    tolerances.assert_trees_equal(kernel, two_steps("xla"))


@given(
    leaf_rows=st.lists(st.integers(1, 100), min_size=1, max_size=4),
    block_rows=st.sampled_from([16, 32]),
    grid=st.integers(1, 9),
)
def test_pipelined_grid_takes_each_block_once(leaf_rows, block_rows, grid):
    """Each block of the plan goes to one CUDA block of the persistent grid,
    `g % grid` of block `g`, which takes its blocks of a segment in order."""
    plan = gpu.segments(leaf_rows, block_rows)
    owners = np.full(sum(s.blocks for s in plan), -1)
    for cta in range(grid):
        for segment in plan:
            first, steps = map(int, gpu.share(segment, cta, grid))
            taken = segment.first_block + first + grid * np.arange(steps)
            assert (taken < segment.first_block + segment.blocks).all()
            assert (owners[taken] == -1).all()
            owners[taken] = cta
    np.testing.assert_array_equal(owners, np.arange(owners.size) % grid)
