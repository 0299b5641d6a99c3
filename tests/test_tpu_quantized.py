"""The TPU kernel with 8-bit state (`mu_dtype=int8`, `nu_dtype=uint8`).

In Pallas' TPU interpreter (races detected, two cores) the kernel's step
equals the XLA path's bit for bit: params, updates, codes and scales, from a
state whose codes are not all zero, with tiles of whole rows and of part
rows, row and column tails, blocks of 128, 256, 384 and 1024. Exported for
TPU from this host it lowers, one launch per dtype group, and declares the
minimum traffic: 8-bit codes and one float32 scale per block, each read and
written once.
"""

from __future__ import annotations

import math
import re

import exporting
import jax.numpy as jnp
import numpy as np
import pytest
from implementations import race_checked, tpu_interpreted
from quantized_kernels import Case, check_recipe_and_skips, check_step, export_step

import pallas_amsgrad
from pallas_amsgrad import _quantization
from pallas_amsgrad.kernels import common, tpu

pytestmark = pytest.mark.slow

TPU_KERNEL = pallas_amsgrad.Pallas(platforms=("tpu",))


CASES = {
    # Tiles of 32 x 256 (two blocks of 128) over rows of 300: row and column
    # tails, a scale per block picked from a tile's two; a small leaf in
    # float32 state (its own dtype group); stochastic rounding.
    "float32-part-rows-stochastic": Case(
        {"w": ((40, 300), jnp.float32), "b": ((7,), jnp.float32)},
        block_rows=64,
        quantization_block=128,
        stochastic_rounding=True,
        seed=7,
    ),
    # A whole leaf per tile: three blocks of a row of 700 (a tail of 188);
    # bfloat16 params, rounded stochastically.
    "bfloat16-whole-rows-stochastic": Case(
        {"t": ((2, 3, 700), jnp.bfloat16)}, block_rows=1024, stochastic_rounding=True
    ),
    # A vector is one row: four blocks of 1024 in one tile.
    "bfloat16-vector-blocks-of-1024": Case(
        {"v": ((4096,), jnp.bfloat16)}, block_rows=1024, quantization_block=1024
    ),
    # Tiles of 16 x 384 over rows of 1000: a block that is not a power of two.
    "float32-blocks-of-384": Case(
        {"w": ((16, 1000), jnp.float32)}, block_rows=16, quantization_block=384
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_kernel_step_equals_the_xla_path_bitwise(case):
    check_step(case, tpu_interpreted(case.block_rows), race_checked)


def test_kernel_recipe_and_skips_keep_codes_and_scales():
    """Clipping and decay on a finite step; on a skipped one `update` (whose
    body selects the old codes and scales) and `step` (every output in place:
    nothing streamed) leave the state's bits as they were."""
    case = Case(
        {"w": ((40, 300), jnp.float32)},
        block_rows=1024,
        weight_decay=0.1,
        max_grad_norm=0.5,
        max_consecutive_errors=2,
    )
    check_recipe_and_skips(case, tpu_interpreted(case.block_rows), race_checked)


# Leaves of a transformer block with 8-bit state, and those that keep float32
# state (under 4096 elements): each quantized leaf's rows a whole tile, part
# rows (50000 columns) and a 3-D leaf with tails.
SHAPES = {
    "embed": (1000, 256),
    "qkv": (256, 768),
    "wide": (64, 50000),
    "heads": (3, 5, 700),
    "vector": (8192,),
    "bias": (1024,),
    "norm": (256,),
}


def _export(dtype, block=256, implementation=TPU_KERNEL, **options):
    return export_step("tpu", SHAPES, dtype, block, implementation, **options)


def _minimum_bytes(param_bytes: int, block: int) -> int:
    """Read param, grad and the moments, write param and the moments, each
    once: 8-bit codes and a float32 scale per block where quantized."""
    total = 0
    for shape in SHAPES.values():
        size = math.prod(shape)
        if _quantization.quantizes(shape):
            scales = math.prod(_quantization.scale_shape(shape, block))
            total += (3 * param_bytes + 3 * 2) * size + 3 * 2 * 4 * scales
        else:
            total += 3 * param_bytes * size + 6 * 4 * size
    return total


@pytest.mark.parametrize(
    "dtype, block, bytes_per_parameter",
    [("float32", 256, 18.1), ("bfloat16", 256, 12.1)],
)
def test_kernel_declares_the_minimum_bytes(dtype, block, bytes_per_parameter):
    """The cost estimate, which the DMAs realise (each block of each array
    copied in and out once): about 18.1 bytes per float32 parameter, 12.1
    per bfloat16 one (4 + 4 or 2 + 2 param, 4 or 2 grad, 3 x (1 + 1) codes,
    3 x 2 x 4 / 256 scales), against 36 and 30 with float32 state."""
    module = _export(dtype, block)
    declared = [int(b) for b in re.findall(r"bytes_accessed\\+22:(\d+)", module)]
    assert sum(declared) == _minimum_bytes(jnp.dtype(dtype).itemsize, block)
    quantized = sum(math.prod(s) for s in SHAPES.values() if _quantization.quantizes(s))
    assert max(declared) / quantized == pytest.approx(bytes_per_parameter, abs=0.05)


def test_default_lowers_a_launch_per_dtype_group_all_in_place():
    """`implementation=None` runs the kernel on TPU, 8-bit state included:
    quantized leaves and float32-state leaves are two dtype groups, two
    Mosaic launches (stochastic rounding and the recipe included), and every
    donated code and scale is written back into its own buffer."""
    module = _export(
        "bfloat16",
        implementation=None,
        stochastic_rounding=True,
        max_grad_norm=1.0,
        max_consecutive_errors=3,
    )
    assert len(exporting.launches(module, "tpu_custom_call")) == 2
    for op in ("pad", "dynamic_update_slice", "gather", "scatter"):
        assert f"stablehlo.{op} " not in module, op
    main = next(
        line for line in module.splitlines() if "func.func public @main" in line
    )
    arguments = main.split(") -> (")[0]
    aliased = re.findall(
        r"tensor<([\dx]+)x(\w+)> \{[^}]*tf\.aliasing_output", arguments
    )
    quantized = [s for s in SHAPES.values() if _quantization.quantizes(s)]
    codes = [a for a in aliased if a[1] in ("i8", "ui8")]
    assert len(codes) == 3 * len(quantized), aliased
    scale_dims = {
        "x".join(map(str, _quantization.scale_shape(s, 256))) for s in quantized
    }
    scales = [a for a in aliased if a == (a[0], "f32") and a[0] in scale_dims]
    assert len(scales) == 3 * len(quantized), aliased


def test_quantized_regions_hold_whole_blocks():
    """Tiles of 8-bit state: columns whole rows or whole quantization
    blocks, rows a multiple of 32 (int8's VMEM tile), each but a tail; and
    the scales' regions one column per block."""
    for shape, block in [
        ((1, 40, 300), 128),
        ((1, 64, 50000), 256),
        ((2, 3, 700), 384),
    ]:
        for elements in (16 * common.LANES, 1024 * common.LANES):
            covered = np.zeros(shape, np.int32)
            scales = np.zeros((*shape[:2], -(-shape[2] // block)), np.int32)
            for region in tpu.regions(shape, elements, quantization_block=block):
                lead, rows, cols = region
                for split, size, multiple in (
                    (rows, shape[1], 32),
                    (cols, shape[2], block),
                ):
                    tail = split.start + split.size * split.blocks == size
                    assert split.size % multiple == 0 or tail, region
                scale_cols = region.of_scales(block).cols
                for i, j, k in np.ndindex(lead.blocks, rows.blocks, cols.blocks):
                    window = (
                        slice(
                            lead.start + i * lead.size, lead.start + (i + 1) * lead.size
                        ),
                        slice(
                            rows.start + j * rows.size, rows.start + (j + 1) * rows.size
                        ),
                    )
                    first = cols.start + k * cols.size
                    covered[(*window, slice(first, first + cols.size))] += 1
                    start = scale_cols.start + k * scale_cols.size
                    assert start * block == first, region
                    scales[(*window, slice(start, start + scale_cols.size))] += 1
            np.testing.assert_array_equal(covered, 1)
            np.testing.assert_array_equal(scales, 1)
