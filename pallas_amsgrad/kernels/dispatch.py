"""The Pallas kernel's choice of platform: which kernel runs a dtype group.

TPU takes the whole group in one launch (`tpu`), GPU one launch per
`gpu.LEAVES_PER_LAUNCH` leaves (`gpu`), and anything else, or any group with
a 64-bit array (no Mosaic kernel takes float64), Pallas' generic interpreter
(`interpret`). The choice is made at lowering (`lax.platform_dependent`), so
`jax.export(..., platforms=["tpu"])` from a CPU host gets the TPU kernel.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

from pallas_amsgrad import _math, _rounding
from pallas_amsgrad.kernels import common, gpu, interpret, tpu

_GROUP_KERNELS = {
    "tpu": tpu.amsgrad_tpu_group,
    "cuda": gpu.amsgrad_gpu_group,
}


def amsgrad_pallas_group(
    coefficients: jax.Array,
    leaves: Sequence[Sequence[jax.Array]],
    *,
    out_dtypes: Sequence[jnp.dtype],
    operands: _math.Operands,
    streams: _rounding.Streams | None = None,
    block_sizes: common.BlockSizes | None = None,
    interpret_params: Any = None,
    platforms: tuple[str, ...] | None = None,
) -> list[tuple[jax.Array, ...]]:
    """Fused AMSGrad on leaves of any shapes that share their dtypes.

    Args:
      coefficients: `_math.Coefficients` packed in the compute dtype.
      leaves: per leaf, its inputs in `operands` order, each of one shape; the
        dtypes of each position are the same for every leaf.
      out_dtypes: dtypes of the outputs written, in `operands` order.
      operands: the order of each leaf's inputs and outputs.
      streams: the random bits' keys, shard offsets and whole leaf shapes,
        where `operands` rounds stochastically; a leaf may be any shard of
        its whole leaf.
      block_sizes: overrides every platform's default.
      interpret_params: a `pltpu.InterpretParams` runs the TPU kernel (its
        blocks, DMAs, SMEM scalars and two cores) in Pallas' TPU interpreter
        on any backend; a Mosaic GPU `InterpretGPUParams` likewise the GPU
        kernel (its grid, TMA copies and barriers). For testing without the
        device.
      platforms: the platforms the group may be lowered for ("tpu", "cuda",
        "cpu", ...); None: any. Only their kernels are traced (a platform
        without one gets the generic interpreter).

    Returns:
      Per leaf, its outputs in the leaf's shape.
    """
    results = [
        tuple(jnp.zeros(leaf[0].shape, d) for d in out_dtypes) for leaf in leaves
    ]
    nonempty = [k for k, leaf in enumerate(leaves) if leaf[0].size]
    if not nonempty:
        return results
    all_dtypes = [x.dtype for x in leaves[0]] + list(out_dtypes)
    # The dtypes of the arrays whose blocks hold as many elements as the
    # leaf's (8-bit state's scales hold one per quantization block).
    blocked_dtypes = [
        d
        for name, d in zip(
            (*operands.inputs, *operands.outputs), all_dtypes, strict=True
        )
        if not name.endswith("_scales")
    ]
    arity = len(leaves[0])
    tables, whole_shapes = [], None
    if operands.rounds_stochastically:
        tables = [_stream_table(streams, nonempty)]
        whole_shapes = tuple(streams.shapes[k] for k in nonempty)

    def branch(platform, interpret_as=False):
        sizes = block_sizes or common.BlockSizes.get_default(platform)
        if platform in common.COMPILED_PLATFORMS:
            common.check_fits(sizes, blocked_dtypes, platform)
        group_kernel = _GROUP_KERNELS.get(platform)

        def run(coefficients, *flat):
            table = flat[0] if tables else None
            flat = flat[len(tables) :]
            grouped = [flat[i : i + arity] for i in range(0, len(flat), arity)]
            options = dict(
                out_dtypes=tuple(out_dtypes),
                block_rows=sizes.block_rows,
                operands=operands,
                table=table,
                whole_shapes=whole_shapes,
            )
            if group_kernel is None:
                return interpret.amsgrad_interpreted_group(
                    coefficients, grouped, **options
                )
            return group_kernel(
                coefficients, grouped, interpret=interpret_as, **options
            )

        return run

    args = [coefficients, *tables, *(x for k in nonempty for x in leaves[k])]
    if interpret_params is not None:
        platform = (
            "tpu" if isinstance(interpret_params, pltpu.InterpretParams) else "cuda"
        )
        outputs = branch(platform, interpret_params)(*args)
    elif any(jnp.dtype(d).itemsize == 8 for d in all_dtypes):
        outputs = branch("interpret")(*args)
    else:
        compiled = [
            p for p in common.COMPILED_PLATFORMS if platforms is None or p in platforms
        ]
        if platforms is not None and len(platforms) == 1:
            outputs = branch(compiled[0] if compiled else "interpret")(*args)
        else:
            outputs = jax.lax.platform_dependent(
                *args,
                default=branch("interpret"),
                **{p: branch(p) for p in compiled},
            )
    for k, leaf_outputs in zip(nonempty, outputs, strict=True):
        results[k] = tuple(leaf_outputs)
    return results


def _stream_table(streams: _rounding.Streams, nonempty) -> jax.Array:
    """The nonempty leaves' rows of `streams.kernel_table()`, flat (SMEM
    holds 1-D arrays best). A kernel numbers a shard's elements from its
    `base`, placing them in the whole leaf by its `_rounding.runs`."""
    table = streams.kernel_table()
    return jnp.concatenate([table[k] for k in nonempty])
