"""The fused AMSGrad Pallas kernels: one pass over every leaf, in place.

Reads (param,) grad, mu, nu, nu_max once and writes (param | update), mu, nu,
nu_max once. Layers read top-down: `amsgrad_group` (platform dispatch) ->
TPU: `_tpu_group` (one launch per dtype group); GPU: `_gpu_group` (one launch
per `GPU_LEAVES_PER_LAUNCH` leaves); the generic interpreter:
`_interpreted_leaf` (a (rows, 128) view) -> `_amsgrad_pallas` (grid,
BlockSpecs, `pallas_call`). Every path runs `amsgrad_kernel`, the body, which
is `_math.amsgrad_block`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.experimental.pallas import tpu as pltpu

from pallas_amsgrad import _gpu_group, _math, _tpu_group

LANES = 128
# Rows of a block must tile bfloat16/float16 on TPU (16 sublanes when packed).
ROW_MULTIPLE = 16
# Mosaic TPU's default scoped VMEM limit on v5e (the smallest of v4/v5e/v5p/v6e).
TPU_VMEM_BYTES = 16 * 1024 * 1024
# Dynamic shared memory per block on H100/H200, as Mosaic GPU checks it.
GPU_SMEM_BYTES = 232448
GPU_WARPGROUP_THREADS = 128
# Leaves per Mosaic GPU launch. Lowering a kernel takes time that grows with
# the square of its TMA copies (jax 0.10.2); GPT-2 small's 148 leaves lowered
# in 52 s as one kernel, 27 s in launches of 64, 18 s of 32, 13 s of 16.
GPU_LEAVES_PER_LAUNCH = 16
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


def amsgrad_group(
    coefficients: jax.Array,
    leaves: Sequence[Sequence[jax.Array]],
    *,
    out_dtypes: Sequence[jnp.dtype],
    apply_to_params: bool,
    block_sizes: BlockSizes | None = None,
    tpu_interpret_params: pltpu.InterpretParams | None = None,
    gpu_interpret_params: Any = None,
) -> list[tuple[jax.Array, ...]]:
    """Fused AMSGrad on leaves of any shapes that share their dtypes.

    TPU takes the whole group in one launch (`_tpu_group`), GPU one launch
    per `GPU_LEAVES_PER_LAUNCH` leaves (`_gpu_group`); the generic
    interpreter runs one kernel per leaf.

    Args:
      coefficients: the `_math.Coefficients` stacked into a 1-D array of the
        compute dtype.
      leaves: per leaf, its ([param,] grad, mu, nu, nu_max), each of one
        shape; the dtypes of each position are the same for every leaf.
      out_dtypes: dtypes of (param | update, mu, nu, nu_max) written.
      apply_to_params: whether each leaf starts with the param to apply the
        update to; if not, the update itself is returned.
      block_sizes: overrides every platform's default.
      tpu_interpret_params: runs the TPU kernel (its blocks, DMAs, SMEM
        scalars and two cores) in Pallas' TPU interpreter on any backend,
        with these settings (e.g. race detection); for testing without a TPU.
      gpu_interpret_params: likewise the GPU kernel (its grid, TMA copies and
        barriers) in Pallas' Mosaic GPU interpreter, given its
        `InterpretGPUParams`.

    Returns:
      Per leaf, (new param | update, mu, nu, nu_max) in the leaf's shape.
    """
    results = [
        tuple(jnp.zeros(leaf[0].shape, d) for d in out_dtypes) for leaf in leaves
    ]
    nonempty = [k for k, leaf in enumerate(leaves) if leaf[0].size]
    if not nonempty:
        return results
    all_dtypes = [x.dtype for x in leaves[0]] + list(out_dtypes)
    has_64_bit = any(jnp.dtype(d).itemsize == 8 for d in all_dtypes)
    arity = len(leaves[0])

    def branch(platform, interpret=False):
        sizes = block_sizes or BlockSizes.get_default(platform)
        if platform in COMPILED_PLATFORMS:
            check_fits(sizes, all_dtypes, platform)
        options = dict(
            out_dtypes=tuple(out_dtypes),
            block_rows=sizes.block_rows,
            apply_to_params=apply_to_params,
        )

        def run(coefficients, *flat):
            grouped = [flat[i : i + arity] for i in range(0, len(flat), arity)]
            if platform == "tpu":
                return _tpu_group.amsgrad_tpu_group(
                    coefficients, grouped, interpret=interpret, **options
                )
            if platform == "cuda":
                chunk = GPU_LEAVES_PER_LAUNCH
                return [
                    leaf_outputs
                    for start in range(0, len(grouped), chunk)
                    for leaf_outputs in _gpu_group.amsgrad_gpu_group(
                        coefficients,
                        grouped[start : start + chunk],
                        interpret=interpret,
                        **options,
                    )
                ]
            return [
                _interpreted_leaf(coefficients, *leaf, **options) for leaf in grouped
            ]

        return run

    args = [coefficients, *(x for k in nonempty for x in leaves[k])]
    if tpu_interpret_params is not None:
        outputs = branch("tpu", tpu_interpret_params)(*args)
    elif gpu_interpret_params is not None:
        outputs = branch("cuda", gpu_interpret_params)(*args)
    elif has_64_bit:  # No accelerator kernel takes float64: interpret anywhere.
        outputs = branch("interpret")(*args)
    else:
        outputs = jax.lax.platform_dependent(
            *args,
            default=branch("interpret"),
            **{p: branch(p) for p in COMPILED_PLATFORMS},
        )
    for k, leaf_outputs in zip(nonempty, outputs, strict=True):
        results[k] = tuple(leaf_outputs)
    return results


def as_rows(x: jax.Array) -> jax.Array:
    """A (rows, 128) view: free when the size divides into 128 lanes; else
    the leaf is padded with zeros (a copy), which compute to zeros."""
    flat = x.reshape(-1)
    if padding := -flat.size % LANES:
        flat = jnp.pad(flat, (0, padding))
    return flat.reshape(-1, LANES)


def from_rows(rows: jax.Array, shape: Sequence[int]) -> jax.Array:
    """The leaf back from its `as_rows` view, any padding cut off."""
    size = math.prod(shape)
    flat = rows.reshape(-1)
    # No slice when nothing was padded: it would stay in the exported program.
    return (flat[:size] if flat.size != size else flat).reshape(shape)


def _interpreted_leaf(coefficients, *inputs, out_dtypes, block_rows, apply_to_params):
    """One kernel for one leaf, through its (rows, 128) view, in Pallas'
    generic interpreter (XLA on whatever backend runs it)."""
    outputs = _amsgrad_pallas(
        coefficients,
        *map(as_rows, inputs),
        out_dtypes=out_dtypes,
        block_rows=block_rows,
        apply_to_params=apply_to_params,
    )
    return tuple(from_rows(out, inputs[0].shape) for out in outputs)


def _amsgrad_pallas(coefficients, *arrays, out_dtypes, block_rows, apply_to_params):
    """One interpreted pallas_call over (rows, 128) arrays; outputs alias
    matching inputs."""
    rows = arrays[0].shape[0]
    block_rows = min(block_rows, rows)  # A block may span the whole array.
    block = pl.BlockSpec((block_rows, LANES), lambda i: (i, 0))
    aliases = {
        1 + k: out  # Operand 0 is the coefficients.
        for k, out in aliased_outputs(arrays, out_dtypes, apply_to_params).items()
    }
    return pl.pallas_call(
        functools.partial(
            amsgrad_kernel, apply_to_params=apply_to_params, load=load, sqrt=jnp.sqrt
        ),
        grid=(pl.cdiv(rows, block_rows),),
        in_specs=[pl.BlockSpec(memory_space=pltpu.SMEM)] + [block] * len(arrays),
        out_specs=[block] * len(out_dtypes),
        out_shape=[
            out_type((rows, LANES), d, [*arrays, coefficients]) for d in out_dtypes
        ],
        input_output_aliases=aliases,
        interpret=True,
        name="amsgrad",  # pragma: no mutate
    )(coefficients, *arrays)


def out_type(shape, dtype, like: Sequence[jax.Array]) -> jax.ShapeDtypeStruct:
    """An output's type, varying over every mesh axis that `like` varies over.

    Inside a `shard_map` that checks how values vary over its axes
    (`check_vma=True`), a kernel's outputs must declare it; elsewhere the set
    is empty.
    """
    varying = frozenset().union(*(jax.typeof(x).mat.varying for x in like))
    return jax.ShapeDtypeStruct(
        shape, dtype, manual_axis_type=jax.sharding.ManualAxisType(varying=varying)
    )


def aliased_outputs(
    inputs: Sequence[jax.Array], out_dtypes: Sequence[jnp.dtype], apply_to_params: bool
) -> dict[int, int]:
    """{input position: output position} for the arrays updated in place.

    Each of param, mu, nu, nu_max is replaced by its output (grad is only
    read); an alias needs equal dtypes, so e.g. a mu promoted from bfloat16
    to float32 is written to a new buffer.
    """
    replaced_by = ([0] if apply_to_params else []) + [None, 1, 2, 3]
    return {
        k: out
        for k, (array, out) in enumerate(zip(inputs, replaced_by, strict=True))
        if out is not None and array.dtype == out_dtypes[out]
    }


def group_aliases(
    leaves: Sequence[Sequence[jax.Array]],
    out_dtypes: Sequence[jnp.dtype],
    apply_to_params: bool,
) -> dict[int, int]:
    """`aliased_outputs` for a group: {flat input: flat output}, where the
    inputs are every leaf's in turn and the outputs every leaf's in turn."""
    return {
        len(leaf) * k + position: len(out_dtypes) * k + out
        for k, leaf in enumerate(leaves)
        for position, out in aliased_outputs(leaf, out_dtypes, apply_to_params).items()
    }


# A scheduling hint, left out of mutation testing: results do not depend on it.
def cost_estimate(
    elements: int, in_dtypes: Sequence[jnp.dtype], out_dtypes: Sequence[jnp.dtype]
) -> pl.CostEstimate:  # pragma: no mutate block
    """What a call costs, for XLA's scheduler: every array read or written
    once, FLOPS_PER_ELEMENT flops and one sqrt per element."""
    bytes_per_element = sum(np.dtype(d).itemsize for d in (*in_dtypes, *out_dtypes))
    return pl.CostEstimate(
        flops=FLOPS_PER_ELEMENT * elements,
        transcendentals=elements,
        bytes_accessed=bytes_per_element * elements,
    )


def load(ref):
    return ref[...]


def gpu_load(ref):
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


def amsgrad_kernel(coefficients_ref, *refs, apply_to_params, load, sqrt):
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
