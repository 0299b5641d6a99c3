"""The GPU kernel with 8-bit state (`mu_dtype=int8`, `nu_dtype=uint8`).

In Pallas' Mosaic GPU interpreter (races detected) the kernel's step equals
the XLA path's bit for bit: params, updates, codes and scales, from a state
whose codes are not all zero, for leaves whose last dim is a multiple of the
quantization block (blocks of whole quantization blocks) and for leaf rows
that end in a shorter block (blocks of whole rows), on the pipelined and the
per-block kernel. Exported for GPU from this host it lowers, a launch per
leaf, in place, and moves the minimum bytes: 8-bit codes and one float32
scale per block, each read and written once.
"""

from __future__ import annotations

import math
import re

import exporting
import jax.numpy as jnp
import numpy as np
import pytest
import quantized_kernels
from implementations import gpu_interpreted
from quantized_kernels import check_recipe_and_skips, check_step, export_step
from test_gpu_interpret import gpu_kernel, race_checked

import pallas_amsgrad
from pallas_amsgrad import _math, _quantization
from pallas_amsgrad.kernels import gpu

pytestmark = pytest.mark.slow

GPU_KERNEL = pallas_amsgrad.Pallas(platforms=("cuda",))


class Case(quantized_kernels.Case):
    """An interpreted comparison on the GPU kernel: the pipelined one on
    `ctas` CUDA blocks, or the per-block one where `ctas` is None."""

    def __init__(self, leaves, block_rows=16, ctas=2, **options):
        super().__init__(leaves, block_rows, **options)
        self.ctas = ctas

    def kernel(self):
        return gpu_kernel(pipelined=self.ctas is not None, ctas=self.ctas)


CASES = {
    # Rows of 256 (one quantization block each, 8 to a block of the kernel)
    # and a vector of 4096 (16 blocks), each two kernel blocks on two CUDA
    # blocks; a small leaf in float32 state (its own dtype group).
    "float32-whole-blocks": Case(
        {
            "w": ((16, 256), jnp.float32),
            "v": ((4096,), jnp.float32),
            "b": ((7,), jnp.float32),
        }
    ),
    # Leaf rows of 300 (a block and a tail of 44; four rows to a kernel
    # block, the last one's copy in ending at the leaf's end) and of 700
    # (15 rows, not a whole number of 16 bytes: padded), bfloat16 params
    # rounded stochastically, on three CUDA blocks.
    "bfloat16-row-tails-stochastic": Case(
        {"w": ((40, 300), jnp.bfloat16), "h": ((3, 5, 700), jnp.float32)},
        ctas=3,
        stochastic_rounding=True,
        seed=7,
    ),
    # The per-block kernel, blocks of 128: rows of 3000 (23 blocks and a
    # tail, two rows as one kernel block, padded), and rows of 512 (four
    # blocks), nu rounded stochastically.
    "float32-per-block-kernel-blocks-of-128": Case(
        {"t": ((2, 3000), jnp.float32), "w": ((8, 512), jnp.float32)},
        ctas=None,
        quantization_block=128,
        stochastic_rounding=True,
    ),
    # Blocks of 512, longer than a TMA box's 256 (bulk copies), and of 384, a
    # block that is not a power of two, over rows of 1000 (a tail of 232).
    "float32-blocks-of-512": Case(
        {"w": ((16, 1024), jnp.float32)}, quantization_block=512
    ),
    "float32-blocks-of-384": Case(
        {"w": ((8, 1000), jnp.float32)}, quantization_block=384
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_kernel_step_equals_the_xla_path_bitwise(case):
    check_step(case, gpu_interpreted(case.block_rows), race_checked)


def test_kernel_recipe_and_skips_keep_codes_and_scales():
    """Clipping and decay on a finite step; on a skipped one `update` and
    `step` (the interpreter writes every output to a new buffer, so the body
    selects the old codes and scales) leave the state's bits as they were:
    rows of whole blocks and rows with a tail."""
    case = Case(
        {"w": ((16, 300), jnp.float32), "v": ((16, 256), jnp.float32)},
        weight_decay=0.1,
        max_grad_norm=0.5,
        max_consecutive_errors=2,
    )
    check_recipe_and_skips(case, gpu_interpreted(case.block_rows), race_checked)


# Leaves of a transformer block with 8-bit state, and those that keep float32
# state (under 4096 elements): rows of whole blocks, a vector, and rows with
# a tail (300 and 700 columns) whose flat views need no padding.
SHAPES = {
    "embed": (1000, 256),
    "qkv": (256, 768),
    "rows": (64, 300),
    "heads": (4, 5, 700),
    "vector": (8192,),
    "bias": (1024,),
    "norm": (256,),
}


def _export(dtype, block=256, implementation=GPU_KERNEL, **options):
    return export_step("cuda", SHAPES, dtype, block, implementation, **options)


MLIR_BYTES = {"f32": 4, "bf16": 2, "i8": 1, "ui8": 1}


def _launch_bytes(line: str) -> int:
    """Bytes a launch's operands and results take, the coefficients aside."""
    inputs, outputs = re.search(r": \((.*)\) -> \((.*)\) loc", line).groups()
    sizes = [
        [
            math.prod(int(d) for d in dims.split("x")) * MLIR_BYTES[dtype]
            for dims, dtype in re.findall(r"tensor<([\dx]+)x(\w+)>", types)
        ]
        for types in (inputs, outputs)
    ]
    (coefficients, *operands), results = sizes
    assert coefficients < 64, inputs
    return sum(operands) + sum(results)


def _minimum_bytes(param_bytes: int, block: int, shapes) -> int:
    """Read param, grad and the moments, write param and the moments, each
    once: 8-bit codes and a float32 scale per block where quantized."""
    total = 0
    for shape in shapes:
        size = math.prod(shape)
        if _quantization.quantizes(shape):
            scales = math.prod(_quantization.scale_shape(shape, block))
            total += (3 * param_bytes + 3 * 2) * size + 3 * 2 * 4 * scales
        else:
            total += 3 * param_bytes * size + 6 * 4 * size
    return total


@pytest.mark.parametrize(
    "dtype, bytes_per_parameter", [("float32", 18.1), ("bfloat16", 12.1)]
)
def test_kernel_moves_the_minimum_bytes(dtype, bytes_per_parameter):
    """Each launch reads its operands and writes its results once (a TMA
    copy per block each way, the scales read and written by the body):
    their sizes add up to the minimum, about 18.1 bytes per float32
    parameter with 8-bit state and 12.1 per bfloat16 one (4 + 4 or 2 + 2
    param, 4 or 2 grad, 3 x (1 + 1) codes, 3 x 2 x 4 / 256 scales), against
    36 and 30 with float32 state."""
    module = _export(dtype)
    itemsize = jnp.dtype(dtype).itemsize
    launches = exporting.launches(module, "mosaic_gpu_v2")
    assert len(launches) == len(SHAPES)
    moved = [_launch_bytes(line) for line in launches]
    assert sum(moved) == _minimum_bytes(itemsize, 256, SHAPES.values())
    quantized = [s for s in SHAPES.values() if _quantization.quantizes(s)]
    quantized_bytes = sum(sorted(moved)[-len(quantized) :])
    assert quantized_bytes == _minimum_bytes(itemsize, 256, quantized)
    per_parameter = quantized_bytes / sum(math.prod(s) for s in quantized)
    assert per_parameter == pytest.approx(bytes_per_parameter, abs=0.05)


def test_lowers_a_launch_per_leaf_all_in_place():
    """`Pallas()` lowered for GPU takes 8-bit state: a launch per leaf
    (stochastic rounding and the recipe included), no copy around them, and
    every donated code and scale written back into its own buffer."""
    module = _export(
        "bfloat16",
        implementation=pallas_amsgrad.Pallas(),
        stochastic_rounding=True,
        max_grad_norm=1.0,
        max_consecutive_errors=3,
    )
    assert len(exporting.launches(module, "mosaic_gpu_v2")) == len(SHAPES)
    # Slices cut each launch's rows of the stream table, nothing else.
    for op in ("pad", "dynamic_update_slice", "gather", "scatter"):
        assert f"stablehlo.{op} " not in module, op
    for line in module.splitlines():
        if "stablehlo.slice " in line:
            assert re.search(r"-> tensor<(1x)?5xui32>", line), line
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
    scales = [a for a in aliased if a[1] == "f32" and a[0] in scale_dims]
    assert len(scales) == 3 * len(quantized), aliased


@pytest.mark.parametrize("block", [128, 256, 384])
def test_blocks_of_whole_rows_copy_in_bounds_and_out_their_own(block):
    """Tiles of leaf rows that end in a shorter block: every block's copy in
    starts on 16 bytes, is whole 128 bytes of 8-bit codes, lies in the view
    and holds the block's rows with room for the last one's spill; copies
    out tile the leaf's elements once, each starting on 16 bytes."""
    operands = _math.Operands(
        apply_to_params=True, quantized=(True, True, True), block=block
    )
    for shape in [(40, 300), (3, 5, 700), (2, 3000), (1, 5000), (16, 1000)]:
        if shape[-1] % block == 0:
            continue
        tiles = gpu.Tiles.of(shape, 16, operands)
        assert tiles.flat, shape
        leaf_rows = math.prod(shape[:-1])
        written = np.zeros(tiles.extent, np.int32)
        for segment in gpu.segments([leaf_rows], tiles.rows):
            (buffer,) = tiles.buffer_shape(segment.rows)
            for b in range(segment.blocks):
                first = segment.row_start + b * segment.rows
                start = int(tiles.start(first, segment.rows))
                offset = int(tiles.offset(first, segment.rows))
                length = -(-segment.rows * tiles.width // 128) * 128
                assert start % 16 == 0 and length % 128 == 0, (shape, first)
                assert start >= 0 and start + length <= tiles.extent
                assert start + offset == first * tiles.width
                assert offset + segment.rows * tiles.width + tiles.spill <= buffer
                out = -(-segment.rows * tiles.width // 16) * 16
                assert (first * tiles.width) % 16 == 0
                written[first * tiles.width : first * tiles.width + out] += 1
        size = math.prod(shape)
        np.testing.assert_array_equal(written[:size], 1)
        assert tiles.extent % 16 == 0 and (written[size:] <= 1).all()
