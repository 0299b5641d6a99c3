"""The GPU kernel under Pallas' Mosaic GPU interpreter, with races detected.

`InterpretGPUParams` simulates a GPU on the CPU: GMEM and SMEM buffers, every
CUDA block of the grid, TMA copies and the barriers that track them, and a
happens-before race detector. The kernel runs with the GPU's own block sizes
and grid; results are checked against the spec.

What jax 0.10's interpreter lacks, and so what this does not cover: it has no
`plgpu.load` (blocks are loaded plainly), cannot fill barriers with NaN (SMEM
starts zeroed) and takes no `jax.Ref` operands (every output is a new buffer;
tests/test_lowering.py checks the compiled kernel's aliases instead).
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import pytest
import strategies
import tolerances
from hypothesis import given, note, settings
from hypothesis import strategies as st
from implementations import check_against_spec, gpu_interpreted, recipe_case
from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call

import amsgrad_spec as spec
from pallas_amsgrad.kernels import common, gpu

pytestmark = pytest.mark.slow

# Rows per CUDA block; small, so that small leaves span several blocks.
GPU_BLOCK_ROWS = [16, 32]


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
    note(f"{hp=} {block_rows=}")
    with race_checked():
        check_against_spec(
            gpu_interpreted(block_rows),
            params,
            grads,
            hp,
            max_ulps=tolerances.INTERPRETED_GPU_ULPS,
        )


def test_gpu_kernel_on_a_multi_block_tree():
    """One fixed case, fast enough for the mutation-testing selection: leaves
    of three whole blocks, of two blocks and a tail, and under one row."""
    params = {
        "w": jnp.linspace(-1, 1, 48 * common.LANES).reshape(48, common.LANES),
        "v": jnp.linspace(-3, 3, 40 * common.LANES).reshape(40, common.LANES),
        "b": jnp.linspace(-2, 2, 100),
    }
    grads = [
        jax.tree.map(lambda p, s=s: jnp.cos(p * (2 + s)), params) for s in range(2)
    ]
    assert len(gpu.segments([48, 40, 1], 16)) == 4
    with race_checked():
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
    with race_checked():
        check_against_spec(
            gpu_interpreted(16),
            params,
            grads,
            hp,
            max_ulps=tolerances.INTERPRETED_GPU_ULPS,
        )
