"""The fused AMSGrad Pallas kernel: one pass over one leaf, in place.

Reads (param,) grad, mu, nu, nu_max once and writes (param | update), mu, nu,
nu_max once. Layers read top-down: `amsgrad_leaf` (layout, padding, platform
dispatch) -> `_amsgrad_pallas` (grid, BlockSpecs, `pallas_call`) ->
`_amsgrad_kernel` (the body, which is `_math.amsgrad_block`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.experimental.pallas import tpu as pltpu

from pallas_amsgrad import _math

LANES = 128
# Rows of a block must tile bfloat16/float16 on TPU (16 sublanes when packed).
ROW_MULTIPLE = 16
# Mosaic TPU's default scoped VMEM limit on v5e (the smallest of v4/v5e/v5p/v6e).
TPU_VMEM_BYTES = 16 * 1024 * 1024
# Dynamic shared memory per block on H100/H200, as Mosaic GPU checks it.
GPU_SMEM_BYTES = 232448
GPU_WARPGROUP_THREADS = 128
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
        cuda: 16 x 128 (8 KiB per float32 array; 72 KiB of the 227 KiB of
          shared memory, so three blocks fit on one SM).
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
    # Mosaic TPU double-buffers every block; Mosaic GPU holds one of each.
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


def amsgrad_leaf(
    coefficients: jax.Array,
    grad: jax.Array,
    mu: jax.Array,
    nu: jax.Array,
    nu_max: jax.Array,
    param: jax.Array | None,
    *,
    out_dtypes: Sequence[jnp.dtype],
    block_sizes: BlockSizes | None = None,
    tpu_interpret_params: pltpu.InterpretParams | None = None,
) -> tuple[jax.Array, ...]:
    """Fused AMSGrad on one leaf of any shape.

    Args:
      coefficients: the `_math.Coefficients` stacked into a 1-D array of the
        compute dtype.
      grad, mu, nu, nu_max: the leaf's gradient and moments, same shape.
      param: the parameter to apply the update to, or None to return the
        update instead.
      out_dtypes: dtypes of (param | update, mu, nu, nu_max) written.
      block_sizes: overrides every platform's default.
      tpu_interpret_params: runs the TPU kernel (its block sizes, SMEM
        scalars, grid semantics) in Pallas' TPU interpreter on any backend,
        with these settings (e.g. race detection); for testing without a TPU.

    Returns:
      (new param | update, mu, nu, nu_max), shaped like `grad`.
    """
    shape = grad.shape
    inputs = ([] if param is None else [param]) + [grad, mu, nu, nu_max]
    size = math.prod(shape)
    if size == 0:
        return tuple(jnp.zeros(shape, d) for d in out_dtypes)
    # A (rows, 128) view is free when the size divides into lanes; otherwise
    # the leaf is padded with zeros, which compute to zeros and are cut off.
    padded = -size % LANES
    rows = (size + padded) // LANES

    def as_rows(x):
        flat = x.reshape(-1)
        if padded:
            flat = jnp.pad(flat, (0, padded))
        return flat.reshape(rows, LANES)

    args = (coefficients, *map(as_rows, inputs))
    all_dtypes = [x.dtype for x in inputs] + list(out_dtypes)
    has_64_bit = any(jnp.dtype(d).itemsize == 8 for d in all_dtypes)

    def branch(platform, interpret=None):
        sizes = block_sizes or BlockSizes.get_default(platform)
        if platform in COMPILED_PLATFORMS:
            check_fits(sizes, all_dtypes, platform)
        return functools.partial(
            _amsgrad_pallas,
            out_dtypes=tuple(out_dtypes),
            block_rows=sizes.block_rows,
            apply_to_params=param is not None,
            platform=platform,
            interpret=interpret,
        )

    if tpu_interpret_params is not None:
        outputs = branch("tpu", tpu_interpret_params)(*args)
    elif has_64_bit:  # No accelerator kernel takes float64: interpret anywhere.
        outputs = branch("interpret")(*args)
    else:
        outputs = jax.lax.platform_dependent(
            *args,
            default=branch("interpret"),
            **{p: branch(p) for p in COMPILED_PLATFORMS},
        )
    return tuple(out.reshape(-1)[:size].reshape(shape) for out in outputs)


def _amsgrad_pallas(
    coefficients, *arrays, out_dtypes, block_rows, apply_to_params, platform, interpret
):
    """One pallas_call over (rows, 128) arrays; outputs alias matching inputs.

    `interpret`: None compiles for `platform` where it is a compiled one and
    interprets elsewhere; `pltpu.InterpretParams` interprets a TPU kernel.
    """
    rows = arrays[0].shape[0]
    block_rows = min(block_rows, rows)  # A block may span the whole array.
    block = pl.BlockSpec((block_rows, LANES), lambda i: (i, 0))
    scalar_space = plgpu.GMEM if platform == "cuda" else pltpu.SMEM
    # The output each array is written back to (grad is only read); an alias
    # needs equal dtypes, so e.g. a mu promoted from bfloat16 is a new buffer.
    write_back = ([0] if apply_to_params else []) + [None, 1, 2, 3]
    aliases = {
        1 + k: out
        for k, (array, out) in enumerate(zip(arrays, write_back, strict=True))
        if out is not None and array.dtype == out_dtypes[out]
    }
    return pl.pallas_call(
        functools.partial(
            _amsgrad_kernel,
            apply_to_params=apply_to_params,
            load=_gpu_load if platform == "cuda" else _load,
            sqrt=_math.sqrt_via_rsqrt if platform == "cuda" else jnp.sqrt,
        ),
        grid=(pl.cdiv(rows, block_rows),),
        in_specs=[pl.BlockSpec(memory_space=scalar_space)] + [block] * len(arrays),
        out_specs=[block] * len(out_dtypes),
        out_shape=[jax.ShapeDtypeStruct((rows, LANES), d) for d in out_dtypes],
        input_output_aliases=aliases,
        compiler_params=_compiler_params(platform),  # pragma: no mutate
        cost_estimate=_cost_estimate(rows, arrays, out_dtypes),  # pragma: no mutate
        interpret=(
            platform not in COMPILED_PLATFORMS if interpret is None else interpret
        ),
        name="amsgrad",  # pragma: no mutate
    )(coefficients, *arrays)


# Scheduling hints, left out of mutation testing: results do not depend on them.
def _compiler_params(platform):  # pragma: no mutate block
    """The grid's steps are independent: TPU may split them across cores."""
    if platform == "tpu":
        return pltpu.CompilerParams(dimension_semantics=("parallel",))
    return None


def _cost_estimate(rows, arrays, out_dtypes):  # pragma: no mutate block
    """What one call costs, for XLA's scheduler: every array read or written
    once, FLOPS_PER_ELEMENT flops and one sqrt per element."""
    elements = rows * LANES
    bytes_moved = elements * (
        sum(a.dtype.itemsize for a in arrays)
        + sum(np.dtype(d).itemsize for d in out_dtypes)
    )
    return pl.CostEstimate(
        flops=FLOPS_PER_ELEMENT * elements,
        transcendentals=elements,
        bytes_accessed=bytes_moved,
    )


def _load(ref):
    return ref[...]


def _gpu_load(ref):
    """Loads every block in one register layout, whatever its dtype.

    Mosaic GPU picks a layout per dtype by default, and cannot then add a
    bfloat16 parameter widened to float32 to a float32 update. The layout
    spreads the block over a warpgroup's 128 threads, `vec_size` elements
    each, so it must divide: a block of one row (a leaf of up to 128
    elements) or an odd number of rows takes one element per thread.
    """
    rows, lanes = ref.shape
    vec_size = 2 if rows * lanes % (2 * GPU_WARPGROUP_THREADS) == 0 else 1
    layout = plgpu.Layout.WG_STRIDED(ref.shape, vec_size=vec_size)
    return plgpu.load(ref, (), layout=layout)


def _amsgrad_kernel(coefficients_ref, *refs, apply_to_params, load, sqrt):
    """The body: load blocks, run `amsgrad_block` in the compute dtype, store."""
    if apply_to_params:
        param_ref, *refs = refs
    grad_ref, mu_ref, nu_ref, nu_max_ref, first_out_ref, *moment_out_refs = refs
    dtype = coefficients_ref.dtype
    coefficients = [coefficients_ref[i] for i in range(len(_math.Coefficients._fields))]
    # jnp.asarray(x, dtype), not x.astype(dtype): with dtype None the first
    # keeps the block's own dtype where the second takes jnp's default float.
    update, *moments = _math.amsgrad_block(
        *(
            jnp.asarray(load(ref), dtype)
            for ref in (grad_ref, mu_ref, nu_ref, nu_max_ref)
        ),
        coefficients,
        sqrt=sqrt,
    )
    if apply_to_params:
        update = jnp.asarray(load(param_ref), dtype) + update
    first_out_ref[...] = update.astype(first_out_ref.dtype)
    for out_ref, value in zip(moment_out_refs, moments, strict=True):
        out_ref[...] = value.astype(out_ref.dtype)
