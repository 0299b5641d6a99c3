"""8-bit block-quantized state: the leaf type, the codes, the scales.

With `mu_dtype=jnp.int8` and/or `nu_dtype=jnp.uint8`, a moment of a leaf of
at least `MIN_QUANTIZED_SIZE` elements is stored as a `QuantizedArray`: one
8-bit code per element and one float32 scale, a power of two, per block of
`block` consecutive elements along the last dimension (a row's tail is a
shorter block). The maps are small floats, `mu` signed E3M4 and `nu`,
`nu_max` unsigned E4M4; the spec (`amsgrad_spec.quantization`) defines them
and docs/quantized-state.md says why these.

Everything here is integer work on float32 bits plus float32 round, floor
and ceil, written for blocks of any shape whose last axis is one
quantization block (or its tail): the XLA path cuts a leaf into such blocks
by a reshape, a kernel takes them from its tile. A scale is carried as its
exponent field F (int32, 0 for a zero scale, 255 for an infinite one), so no
float32 subnormal is ever formed, which TPUs and XLA:CPU flush and GPUs keep.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from pallas_amsgrad import _math, _rounding

# Elements per block along the last dimension: `quantization_block`'s default.
QUANTIZATION_BLOCK = 256
# What a block must be a multiple of: a TPU vreg's and the GPU kernel's 128
# lanes, so that a kernel's tile holds whole blocks.
BLOCK_UNIT = 128
# Smaller leaves keep float32 moments (as torchao's and bitsandbytes' 8-bit
# optimizers): the saving is small and the scales' share large.
MIN_QUANTIZED_SIZE = 4096
QUANTIZED_DTYPES = (jnp.dtype(jnp.int8), jnp.dtype(jnp.uint8))

_MANTISSA_BITS = 23
_EXPONENT_BIAS = 127
_MAGNITUDE = 0x7FFFFFFF
_INFINITE_FIELD = 255
_INFINITY_BITS = 0x7F800000


class CodeMap(NamedTuple):
    """An 8-bit small float with subnormals and no inf or NaN, top binade
    [1, 2): a magnitude code c = (E << m) | M reads 2^(E - bias) (1 + M/2^m),
    or 2^(1 - bias) M/2^m for E = 0; signed maps store sign * c in an int8."""

    exponent_bits: int
    mantissa_bits: int
    signed: bool

    @property
    def min_exponent(self) -> int:
        return 2 - 2**self.exponent_bits

    @property
    def dtype(self) -> jnp.dtype:
        return jnp.dtype(jnp.int8 if self.signed else jnp.uint8)


MU_MAP = CodeMap(exponent_bits=3, mantissa_bits=4, signed=True)
NU_MAP = CodeMap(exponent_bits=4, mantissa_bits=4, signed=False)


def code_map(dtype: Any) -> CodeMap:
    """The map of a code dtype: int8 `mu`'s, uint8 `nu`'s and `nu_max`'s."""
    return MU_MAP if jnp.dtype(dtype) == jnp.int8 else NU_MAP


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedArray:
    """One moment of one leaf, block-quantized: a pytree of two arrays.

    Attributes:
      codes: int8 (`mu`) or uint8 (`nu`, `nu_max`), the leaf's shape.
      scales: float32 powers of two (0: an all-zero block), of shape
        `(*shape[:-1], ceil(shape[-1] / block))`, sharded as the leaf.
      block: elements per block along the last dimension (static).

    `pallas_amsgrad.dequantize(leaf)` reads it back as float32.
    """

    codes: jax.Array
    scales: jax.Array
    block: int = dataclasses.field(
        default=QUANTIZATION_BLOCK, metadata={"static": True}
    )

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape)

    @property
    def dtype(self) -> jnp.dtype:
        """The codes' dtype: int8 or uint8."""
        return self.codes.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size + 4 * math.prod(self.scales.shape)


def quantizes(shape: Any) -> bool:
    """Whether a moment of a leaf of `shape` is stored quantized when its
    dtype asks for it: at least MIN_QUANTIZED_SIZE elements and a last
    dimension of at least 2 (a one-element block costs 5 bytes, float32 4)."""
    shape = tuple(shape)
    return bool(shape) and math.prod(shape) >= MIN_QUANTIZED_SIZE and shape[-1] >= 2


def scale_shape(shape: Any, block: int) -> tuple[int, ...]:
    """(*shape[:-1], ceil(shape[-1] / block))."""
    *lead, n = shape
    return (*lead, -(-n // block))


def stored_dtype(shape: Any, requested: Any) -> Any:
    """The dtype a moment is kept in: `requested`, except that a leaf too
    small to quantize keeps an 8-bit request in float32."""
    if requested is not None and jnp.dtype(requested) in QUANTIZED_DTYPES:
        return requested if quantizes(shape) else jnp.dtype(jnp.float32)
    return requested


# --- On float32 bits. --------------------------------------------------------


def _bits(x) -> jax.Array:
    return jax.lax.bitcast_convert_type(jnp.asarray(x, jnp.float32), jnp.int32)


def _field(raw) -> jax.Array:
    return (raw & _MAGNITUDE) >> _MANTISSA_BITS


def magnitude_bits(x) -> jax.Array:
    """|x|'s float32 bits as int32, a subnormal as 0: for such bits integer
    order is float order (NaN above inf), so a block's max |x| is an integer
    max."""
    raw = _bits(x) & _MAGNITUDE
    return jnp.where(_field(raw) == 0, 0, raw)


def scale_field(absmax_bits, cmap: CodeMap) -> jax.Array:
    """The exponent field of the block's scale (int32) from its max |x|
    (`magnitude_bits`, reduced): the smallest power of two s with
    max |x| <= top * s, by rounding max |x| up to the top binade's mantissa
    bits; 0 for an all-zero block, 255 (inf) for NaN, inf or overflow."""
    raw = jnp.minimum(absmax_bits, _INFINITY_BITS)
    top_bits = cmap.mantissa_bits - (cmap.exponent_bits == 0)
    rounding = 2 ** (_MANTISSA_BITS - top_bits) - 1
    field = jnp.minimum((raw + rounding) >> _MANTISSA_BITS, _INFINITE_FIELD)
    return jnp.where(raw == 0, 0, field)


def scales_of(field) -> jax.Array:
    """The float32 scale of an exponent field."""
    return jax.lax.bitcast_convert_type(field << _MANTISSA_BITS, jnp.float32)


def field_of(scales) -> jax.Array:
    """The exponent field of a float32 scale (int32)."""
    return _field(_bits(scales))


def encode(x, field, cmap: CodeMap, rounding: str, random=None) -> jax.Array:
    """The codes of x / scale (x float32; `field` broadcasts against it).

    rounding: "nearest" (ties to even), "up" (toward +inf: never below x,
    a positive x never 0) or "stochastic" (away from zero with probability
    ceil(f * 2^24) / 2^24 for the fraction f, by the top 24 of `random`'s
    uint32 bits). Zero and inf scales give code 0.
    """
    m, min_exponent = cmap.mantissa_bits, cmap.min_exponent
    exponent = field - _EXPONENT_BIAS
    raw = _bits(x)
    x_field = _field(raw)
    zero = x_field == 0
    binade = jnp.maximum(x_field - _EXPONENT_BIAS - exponent, min_exponent)
    binade = binade - min_exponent
    shift = m - min_exponent - binade - exponent
    tiny = x_field + shift < 1
    n = jax.lax.bitcast_convert_type(
        jnp.where(tiny | zero, 0, (raw & _MAGNITUDE) + (shift << _MANTISSA_BITS)),
        jnp.float32,
    )
    negative = (raw < 0) & ~zero
    if rounding == "nearest":
        rounded = round_half_even(n)
    elif rounding == "up":
        below = floor_nonnegative(n)
        above = below + jnp.where(below < n, 1.0, 0.0)
        rounded = jnp.where(negative, below, above)
        rounded = jnp.where(tiny & ~negative & ~zero, 1.0, rounded)
    else:
        below = floor_nonnegative(n)
        # Through int32: Mosaic converts signed integers to float, not unsigned.
        r = _as_int32(jnp.asarray(random, jnp.uint32) >> 8).astype(jnp.float32)
        rounded = below + jnp.where(r < (n - below) * 2.0**24, 1.0, 0.0)
    code = jnp.where(zero, 0, (binade << m) + rounded.astype(jnp.int32))
    code = jnp.where(negative, -code, code)
    finite = (field > 0) & (field < _INFINITE_FIELD)
    return jnp.where(finite, code, 0).astype(cmap.dtype)


def round_half_even(n) -> jax.Array:
    """A float32 0 <= n < 2^31 rounded to an integer, ties to even, from its
    floor and exact float32 arithmetic: Mosaic TPU does not lower
    `jnp.round`'s roundeven on every chip, and XLA folds (n + 2^23) - 2^23
    back to n."""
    below = floor_nonnegative(n)
    fraction = n - below
    odd = below - 2.0 * floor_nonnegative(below * 0.5) == 1.0
    up = (fraction > 0.5) | ((fraction == 0.5) & odd)
    return below + jnp.where(up, 1.0, 0.0)


def floor_nonnegative(n) -> jax.Array:
    """jnp.floor of a float32 0 <= n < 2^31, by truncation through int32:
    Mosaic GPU lowers no floor or ceil. (`encode` keeps no code of a NaN,
    inf or larger n.)"""
    return n.astype(jnp.int32).astype(jnp.float32)


def _as_int32(x) -> jax.Array:
    return jax.lax.bitcast_convert_type(x, jnp.int32)


def decode(codes, field, cmap: CodeMap) -> jax.Array:
    """value(code) * scale, float32 (`field` broadcasts against codes): exact,
    0 below 2^-126 and for a zero scale, NaN for an infinite one."""
    m = cmap.mantissa_bits
    code = jnp.asarray(codes).astype(jnp.int32)
    magnitude = jnp.abs(code)
    binade = magnitude >> m
    integer = (magnitude & (2**m - 1)) + jnp.where(binade > 0, 2**m, 0)
    exponent = field - _EXPONENT_BIAS
    shift = cmap.min_exponent - m + jnp.maximum(binade - 1, 0) + exponent
    raw = _bits(integer.astype(jnp.float32))
    normal = (integer > 0) & (_field(raw) + shift >= 1)
    value = jax.lax.bitcast_convert_type(
        jnp.where(normal, raw + (shift << _MANTISSA_BITS), 0), jnp.float32
    )
    value = jnp.where(code < 0, -value, value)
    return jnp.where(field >= _INFINITE_FIELD, jnp.nan, value)


def block_absmax(x) -> jax.Array:
    """`magnitude_bits` of each block's max |x| (the last axis kept, of size
    1), NaN taken as inf.

    Reduced as float32, which every backend reduces along lanes: for these
    bits (no subnormal, nothing above inf) float order is integer order."""
    bits = jnp.minimum(magnitude_bits(x), _INFINITY_BITS)
    magnitudes = jax.lax.bitcast_convert_type(bits, jnp.float32)
    return _bits(jnp.max(magnitudes, axis=-1, keepdims=True))


def quantize_blocks(x, cmap: CodeMap, rounding: str, random=None):
    """(codes, scale fields) of x (float32) whose last axis is one block;
    the fields keep that axis with size 1."""
    field = scale_field(block_absmax(x), cmap)
    return encode(x, field, cmap, rounding, random), field


# --- Whole leaves (the XLA path, the spec-facing helpers). -------------------


def _as_blocks(x, block: int) -> jax.Array:
    """(..., n) -> (..., ceil(n / block), block), the tail zero-padded."""
    *lead, n = x.shape
    count = -(-n // block)
    if count * block != n:
        x = jnp.pad(x, [(0, 0)] * len(lead) + [(0, count * block - n)])
    return x.reshape(*lead, count, block)


def _from_blocks(x, n: int) -> jax.Array:
    flat = x.reshape(*x.shape[:-2], -1)
    return flat if flat.shape[-1] == n else flat[..., :n]


def quantize(
    x, cmap: CodeMap, rounding: str, random=None, block: int = QUANTIZATION_BLOCK
) -> QuantizedArray:
    """x (any float, taken as float32) stored block by block."""
    x = jnp.asarray(x, jnp.float32)
    n = x.shape[-1]
    if random is not None:
        random = _as_blocks(random, block)
    codes, field = quantize_blocks(_as_blocks(x, block), cmap, rounding, random)
    return QuantizedArray(_from_blocks(codes, n), scales_of(field[..., 0]), block)


def dequantize(leaf: Any) -> jax.Array:
    """Any moment of the state as float32: a `QuantizedArray` decoded (exact:
    code value times scale), any other array cast."""
    if not isinstance(leaf, QuantizedArray):
        return jnp.asarray(leaf, jnp.float32)
    n = leaf.shape[-1]
    codes = _as_blocks(leaf.codes, leaf.block)
    field = field_of(leaf.scales)[..., None]
    return _from_blocks(decode(codes, field, code_map(leaf.dtype)), n)


# --- A leaf's step: read the moments, store the results. ---------------------


def roundings(operands) -> tuple[str, str, str]:
    """How each moment (mu, nu, nu_max) is rounded to its codes: `nu_max` up,
    always; `mu` and `nu` to nearest, or stochastically where asked."""
    return (
        "stochastic" if operands.stochastic[1] else "nearest",
        "stochastic" if operands.stochastic[2] else "nearest",
        "up",
    )


def read_leaf(leaf, operands, dtype) -> list[jax.Array]:
    """A whole leaf's inputs (`operands` order) in `dtype`, each quantized
    moment dequantized: the inputs of `operands.decoded()`."""

    def dequantized(codes, scales):
        return dequantize(QuantizedArray(codes, scales, operands.block))

    return _read(leaf, operands, dtype, dequantized)


def read_blocks(blocks, operands, dtype) -> list[jax.Array]:
    """`read_leaf` for blocks whose last axis is one quantization block: each
    quantized moment's scales given as exponent fields (`field_of`) with that
    axis of size 1."""

    def decoded(codes, field):
        return decode(codes, field, code_map(codes.dtype))

    return _read(blocks, operands, dtype, decoded)


def _read(leaf, operands, dtype, dequantized) -> list[jax.Array]:
    param, grad, *moments = operands.split(leaf)
    read = [] if param is None else [param]
    read.append(grad)
    for moment in moments:
        if isinstance(moment, tuple):
            moment = dequantized(*moment)
        read.append(moment)
    return [
        jnp.asarray(x, _math.read_dtype(name, x.dtype, dtype))
        for name, x in zip(operands.decoded().inputs, read, strict=True)
    ]


def store_leaf(
    outputs, out_dtypes, operands, keys=None, index=None, *, differentiable=False
) -> tuple[jax.Array, ...]:
    """A whole leaf's four outputs (first, mu, nu, nu_max; unrounded, in the
    compute dtype) stored as `operands.outputs`, of `out_dtypes`: quantized
    moments as codes and scales, the rest rounded by `_rounding.store`."""

    def quantized(x, cmap, rounding, random):
        leaf = quantize(x, cmap, rounding, random, operands.block)
        return leaf.codes, leaf.scales

    return _store(outputs, out_dtypes, operands, keys, index, quantized, differentiable)


def store_blocks(
    outputs, out_dtypes, operands, keys=None, index=None
) -> tuple[jax.Array, ...]:
    """`store_leaf` for outputs whose last axis is one quantization block:
    each quantized moment's scales as exponent fields, that axis of size 1."""
    return _store(outputs, out_dtypes, operands, keys, index, quantize_blocks)


def _store(outputs, out_dtypes, operands, keys, index, quantized, differentiable=False):
    named = dict(zip(operands.outputs, out_dtypes, strict=True))
    plain = [j for j in range(4) if j == 0 or not operands.quantized[j - 1]]
    names = ("first", "mu", "nu", "nu_max")
    plain_dtypes = [out_dtypes[0] if j == 0 else named[names[j]] for j in plain]
    stored = dict(
        zip(
            plain,
            _rounding.store(
                [outputs[j] for j in plain],
                plain_dtypes,
                [operands.stochastic[j] for j in plain],
                None if keys is None else [keys[j] for j in plain],
                index,
                differentiable=differentiable,
            ),
            strict=True,
        )
    )
    hashed = None
    for j, rounding in zip((1, 2, 3), roundings(operands), strict=True):
        if not operands.quantized[j - 1]:
            continue
        random = None
        if rounding == "stochastic":
            if hashed is None:
                hashed = _rounding.mix32(index() if callable(index) else index)
            random = _rounding.mix32(keys[j] ^ hashed)
        stored[j] = quantized(outputs[j], code_map(named[names[j]]), rounding, random)
    return operands.join_outputs(*(stored[j] for j in range(4)))


# --- The finite guard's skip. ---------------------------------------------------


def unless_accepted(stored, inputs, operands, accept) -> tuple[jax.Array, ...]:
    """A kernel's stored outputs where the finite guard accepts the step;
    where it skips, the param as it was (or a zero update) and every moment
    as it was, codes and scales bitwise (a skipped step must not re-quantize
    the values it read back)."""
    named = dict(zip(operands.inputs, inputs, strict=True))
    kept = []
    for name, value in zip(operands.outputs, stored, strict=True):
        old = (
            named[name].astype(value.dtype) if name in named else jnp.zeros_like(value)
        )
        kept.append(jnp.where(accept, value, old))
    return tuple(kept)
