"""The TPU kernel under Pallas' TPU interpreter, with its race detector on.

`pltpu.InterpretParams` simulates a TPU on the CPU: HBM and VMEM buffers, the
SMEM scalars, DMAs and their semaphores, two TensorCores sharing the
"parallel" grid in a random order, a happens-before race detector, NaN-filled
uninitialized memory and an error on any out-of-bounds read. The kernel runs with the TPU's own block sizes and
compiler parameters; results are checked against the spec.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest
import strategies
import tolerances
from hypothesis import given, note, settings
from hypothesis import strategies as st
from implementations import (
    check_against_spec,
    optimizer,
    race_checked,
    recipe_case,
    tpu_interpreted,
)
from jax._src.pallas.mosaic.interpret import interpret_pallas_call
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

import amsgrad_spec as spec
from pallas_amsgrad.kernels import common, tpu

pytestmark = pytest.mark.slow

# Block rows on the interpreted TPU; the defaults (1024) would make every test
# array a single block. Small blocks give multi-step grids on small arrays.
TPU_BLOCK_ROWS = [16, 32]


@settings(max_examples=1)
@given(data=st.data())
@pytest.mark.parametrize(
    "dtype, mu_dtype",
    strategies.INTERPRETER_DTYPE_PAIRS,
    ids=strategies.INTERPRETER_DTYPE_IDS,
)
def test_tpu_kernel_matches_spec_without_races(dtype, mu_dtype, data):
    params, grads, hp, block_rows = data.draw(
        strategies.interpreter_cases(dtype, mu_dtype, TPU_BLOCK_ROWS)
    )
    seed = data.draw(st.integers(0, 2**16))
    note(f"{hp=} {block_rows=} {seed=}")
    with race_checked():
        check_against_spec(
            tpu_interpreted(block_rows, random_seed=seed),
            params,
            grads,
            hp,
            max_ulps=tolerances.INTERPRETED_TPU_ULPS,
        )


def test_tpu_kernel_on_a_multi_block_tree():
    """One fixed case, fast enough for the mutation-testing selection: one
    step (`update` and `step`) over two dtype groups, from a state the XLA path
    left after a first step, with gradients that keep the old nu_max in some
    places and not in others. Blocks of 32 x 128 take two (96, 128)
    leaves in one loop of six blocks, three per core; tile a (40, 300) leaf in
    four regions (whole blocks, tail rows, tail columns, the corner); take a
    3-D leaf two whole (3, 7) slices at a time, then its last; and a vector
    that is not a whole number of rows."""
    params = {
        "w": jnp.linspace(-1, 1, 96 * common.LANES).reshape(96, common.LANES),
        "w_twin": jnp.linspace(2, -1, 96 * common.LANES).reshape(96, common.LANES),
        "wide": jnp.linspace(-1, 1, 40 * 300).reshape(40, 300),
        "3d": jnp.linspace(-2, 2, 5 * 3 * 7).reshape(5, 3, 7).astype(jnp.bfloat16),
        "vector": jnp.linspace(-3, 3, 1000).astype(jnp.bfloat16),
    }
    elements = 32 * common.LANES
    assert len(tpu.regions((1, 40, 300), elements)) == 4
    assert tpu.regions((5, 3, 7), elements)[0].block == (2, 3, 7)
    hp = spec.Hyperparams(0.01, mu_dtype=jnp.float32)
    warm_up = optimizer(hp, "xla")
    first = jax.tree.map(lambda p: 2 * jnp.cos(3 * p), params)
    _, state = warm_up.update(first, warm_up.init(params), params)
    grads = jax.tree.map(lambda p: 3 * jnp.cos(2 * p), params)
    _, after = spec.update(grads, spec.AmsgradState(*state[0]), hp)
    kept = after.nu_max["w"] == state[0].nu_max["w"]
    assert jnp.any(kept) and not jnp.all(kept), "the old nu_max must win somewhere"
    with race_checked():
        check_against_spec(
            tpu_interpreted(32),
            params,
            [grads],
            hp,
            max_ulps=tolerances.INTERPRETED_TPU_ULPS,
            state=state,
        )


def _warning_on_races(params):
    """`params` recording races rather than raising on the first (jax 0.12's
    default, `on_race="raise"`; older jax records them)."""
    if "on_race" in {field.name for field in dataclasses.fields(params)}:
        return dataclasses.replace(params, on_race="warn")
    return params


def test_race_detector_sees_a_racy_kernel():
    """The harness fails on races: two cores writing one block are caught."""

    def racy(x_ref, o_ref):
        o_ref[...] = x_ref[...] + 1

    racy_call = pl.pallas_call(
        racy,
        grid=(2,),
        in_specs=[pl.BlockSpec((16, 128), lambda i: (i, 0))],
        out_specs=pl.BlockSpec((16, 128), lambda i: (0, 0)),  # Shared by both.
        out_shape=jax.ShapeDtypeStruct((16, 128), jnp.float32),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        interpret=_warning_on_races(tpu_interpreted(16).interpret_params),
    )
    pltpu.reset_tpu_interpret_mode_state()
    jax.block_until_ready(racy_call(jnp.zeros((32, 128), jnp.float32)))
    assert interpret_pallas_call.races.races_found


def test_tpu_kernel_runs_the_recipe_and_skips_without_moving_bytes():
    """Clipping, masked decay and skips on the TPU kernel: a finite step, a
    skipped one (every output aliased, so the kernel streams no block and the
    buffers keep their values, checked by the spec's bits) and one more."""
    params, grads, hp = recipe_case(300)
    with race_checked():
        check_against_spec(
            tpu_interpreted(32),
            params,
            grads,
            hp,
            max_ulps=tolerances.INTERPRETED_TPU_ULPS,
        )
