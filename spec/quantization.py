"""8-bit block-quantized optimizer state: code maps, block scales, rounding.

Not in optax. With `mu_dtype=jnp.int8` and `nu_dtype=jnp.uint8`, `mu`, `nu`
and `nu_max` are stored as one 8-bit code per element and one float32 scale
per block of `block` (256) consecutive elements along the leaf's last
dimension, a row's tail being a shorter block: x ~ value(code) * scale. About
3.05 bytes per parameter for the three moments instead of 12.

The maps are small floats, chosen by measurement
(`benchmarks/quantization_maps.py`, docs/quantized-state.md): `MU_MAP`, signed
E3M4 (sign and magnitude, 3 exponent and 4 mantissa bits, subnormals), and
`NU_MAP`, unsigned E4M4; each block's scale is the smallest power of two
that fits the block's largest magnitude under the map's largest value. A
power-of-two scale makes x / scale and value * scale exact, so each store
rounds once, in the code, and everything is integer work on float32 bits
(shifts, masks, adds to the exponent field) and float32 floor/ceil/round:
no table lookup (a gather per element), no division that a TPU or GPU would
compute differently, no float32 subnormal that one flushes and another keeps
(the spec counts float32 subnormals as 0, as TPUs and XLA:CPU do).

Rounding (`quantize`'s `rounding`): "nearest" (ties to the even code),
"up" (the smallest code at or above x: `nu_max`, so the stored maximum never
falls below the exact one and never decreases, and a step is never larger
than exact AMSGrad's from the same state), and "stochastic" (one of the two
neighbouring codes, unbiased, by `rounding.random_bits`). A zero is stored as
code 0 and reads back as exactly 0; a positive value rounded up never reads
back as 0.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

# Elements per block along the last dimension: `quantization_block`'s default.
QUANTIZATION_BLOCK = 256
# Leaves with fewer elements stay float32, as torchao's and bitsandbytes'
# 8-bit optimizers keep them: the saving is small, the scales' share large.
MIN_QUANTIZED_SIZE = 4096
ROUNDINGS = ("nearest", "up", "stochastic")

# float32's layout.
_MANTISSA_BITS = 23
_EXPONENT_BIAS = 127
_MAGNITUDE = 0x7FFFFFFF
_INFINITE_EXPONENT = 255
_INFINITY = 0x7F800000


@dataclasses.dataclass(frozen=True)
class CodeMap:
    """An 8-bit small float: `exponent_bits` e, `mantissa_bits` m, subnormals,
    no inf or NaN, and its top binade [1, 2).

    The magnitude code c = (E << m) | M reads as

        value(c) = 2^(E - bias) * (1 + M / 2^m)   for E >= 1,
        value(c) = 2^(1 - bias) * M / 2^m         for E = 0 (subnormal),

    with bias = 2^e - 1; values grow with c. Unsigned maps use all 8 bits
    for c (uint8); signed ones store sign * c in an int8 (two's complement,
    c <= 127: -128 is never written), so one zero and codes ordered as their
    values. e = 0 is a linear map: c * 2^(1 - m).
    """

    exponent_bits: int
    mantissa_bits: int
    signed: bool

    def __post_init__(self):
        bits = self.exponent_bits + self.mantissa_bits + self.signed
        # At most 6 exponent bits: every value is a float32 normal.
        if bits != 8 or self.mantissa_bits < 1 or not 0 <= self.exponent_bits <= 6:
            raise ValueError(
                f"a code map has 8 bits, a mantissa and at most 6 exponent bits: "
                f"{self.exponent_bits=}, {self.mantissa_bits=}, {self.signed=}"
            )

    @property
    def bias(self) -> int:
        return 2**self.exponent_bits - 1

    @property
    def min_exponent(self) -> int:
        """The exponent of the smallest normal value (of the subnormals' spacing
        times 2^m)."""
        return 1 - self.bias

    @property
    def max_code(self) -> int:
        """The largest magnitude code: 127 signed, 255 unsigned."""
        return 2 ** (self.exponent_bits + self.mantissa_bits) - 1

    @property
    def top(self) -> float:
        """value(max_code): 2 - 2^-m, or 2 - 2^(1 - m) for a linear map."""
        return 2 - 2.0**-self.top_mantissa_bits

    @property
    def top_mantissa_bits(self) -> int:
        """The bits below the leading one in the top binade's values."""
        return self.mantissa_bits - (self.exponent_bits == 0)

    @property
    def dtype(self):
        return jnp.dtype(jnp.int8 if self.signed else jnp.uint8)


# The maps of the quantized state, chosen by measurement (module docstring).
MU_MAP = CodeMap(exponent_bits=3, mantissa_bits=4, signed=True)
NU_MAP = CodeMap(exponent_bits=4, mantissa_bits=4, signed=False)


# --- The map, scaled by 2^K: value <-> code, on float32 bits. ----------------


def _bits(x) -> jax.Array:
    """The float32 bits of x, as int32."""
    return jax.lax.bitcast_convert_type(jnp.asarray(x, jnp.float32), jnp.int32)


def _biased_exponent(raw) -> jax.Array:
    """The exponent field of float32 bits (0: zero or subnormal; 255: inf,
    NaN)."""
    return (raw & _MAGNITUDE) >> _MANTISSA_BITS


def _scaled_codes(x, exponent, code_map: CodeMap, rounding: str, bits) -> jax.Array:
    """The codes of x / 2^K, K = `exponent` (int32, broadcast against x).

    Integer arithmetic on x's bits, so that nothing is ever a float32
    subnormal (which TPUs and XLA:CPU flush to zero and others keep): with
    E_x x's exponent, the binade of x / 2^K in the map is
    b = max(E_x - K, min_exponent) - min_exponent, its spacing
    2^(min_exponent - m + b), and n = |x| / (spacing * 2^K) is x's bits with
    m - min_exponent - b - K added to the exponent field.
    """
    m, min_exponent = code_map.mantissa_bits, code_map.min_exponent
    raw = _bits(x)
    field = _biased_exponent(raw)
    zero = field == 0  # A float32 subnormal counts as zero.
    binade = jnp.maximum(field - _EXPONENT_BIAS - exponent, min_exponent)
    binade = binade - min_exponent
    shift = m - min_exponent - binade - exponent
    tiny = field + shift < 1  # n < 2^-126: below every rounding but "up".
    n = jax.lax.bitcast_convert_type(
        jnp.where(tiny | zero, 0, (raw & _MAGNITUDE) + (shift << _MANTISSA_BITS)),
        jnp.float32,
    )
    negative = (raw < 0) & ~zero
    if rounding == "nearest":
        rounded = jnp.round(n)  # Half to even.
    elif rounding == "up":
        rounded = jnp.where(negative, jnp.floor(n), jnp.ceil(n))
        rounded = jnp.where(tiny & ~negative & ~zero, 1.0, rounded)
    else:
        below = jnp.floor(n)
        r = (jnp.asarray(bits, jnp.uint32) >> 8).astype(jnp.float32)
        rounded = below + jnp.where(r < (n - below) * 2.0**24, 1.0, 0.0)
    code = jnp.where(zero, 0, (binade << m) + rounded.astype(jnp.int32))
    return jnp.where(negative, -code, code).astype(code_map.dtype)


def _scaled_values(codes, exponent, code_map: CodeMap) -> jax.Array:
    """value(code) * 2^K, float32, K = `exponent` (int32, broadcast against
    codes); 0 where it is below 2^-126 (a float32 subnormal).

    value(code) = n * 2^(min_exponent - m + max(b - 1, 0)), n = M for b = 0
    and 2^m + M otherwise: float(n) (exact) with that exponent plus K added
    to its exponent field.
    """
    m = code_map.mantissa_bits
    magnitude = jnp.abs(jnp.asarray(codes).astype(jnp.int32))
    binade = magnitude >> m
    integer = (magnitude & (2**m - 1)) + jnp.where(binade > 0, 2**m, 0)
    shift = code_map.min_exponent - m + jnp.maximum(binade - 1, 0) + exponent
    raw = _bits(integer.astype(jnp.float32))
    normal = (integer > 0) & (_biased_exponent(raw) + shift >= 1)
    value = jax.lax.bitcast_convert_type(
        jnp.where(normal, raw + (shift << _MANTISSA_BITS), 0), jnp.float32
    )
    return jnp.where(jnp.asarray(codes) < 0, -value, value)


def decode(codes, code_map: CodeMap) -> jax.Array:
    """value(code), float32, exact; negative for negative codes."""
    return _scaled_values(codes, 0, code_map)


def encode(q, code_map: CodeMap, rounding: str = "nearest", bits=None) -> jax.Array:
    """The code of a normalized float32 q (|q| <= top; 0 <= q unsigned),
    rounded once by `rounding`, in the map's dtype.

    On |q|'s binade b = max(floor(log2 |q|), min_exponent) - min_exponent
    (0 in the subnormal range) the codes are spaced 2^(min_exponent - m + b),
    so n = |q| / spacing is exact and the code is (b << m) + round(n), round
    being: to the nearest integer, ties to even ("nearest"); ceil for q >= 0
    and floor for q < 0 ("up": toward +inf); floor(n) + 1 when r < f * 2^24
    and floor(n) otherwise ("stochastic": away from zero with probability
    P = ceil(f * 2^24) / 2^24, f = n - floor(n), r the top 24 of the
    element's `bits`; P = f exactly for |q| at or above half the smallest
    nonzero value). A carry into the next binade is that binade's first code.

    float32 subnormals count as 0 (as TPUs and XLA:CPU flush them). An n
    below 2^-126 (|q| below 2^-126 of the smallest spacing) rounds to 0,
    except up from a positive q: to the smallest nonzero code.
    """
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding is one of {ROUNDINGS}, not {rounding!r}")
    if rounding == "stochastic" and bits is None:
        raise ValueError("stochastic rounding needs `bits`")
    return _scaled_codes(q, 0, code_map, rounding, bits)


def code_values(code_map: CodeMap) -> jax.Array:
    """Every code's value, float32, in code order: 256 unsigned (0 to 255),
    255 signed (-127 to 127)."""
    low = -code_map.max_code if code_map.signed else 0
    return decode(jnp.arange(low, code_map.max_code + 1), code_map)


# --- Blocks along the last dimension. ---------------------------------------


def scale_shape(shape, block: int = QUANTIZATION_BLOCK) -> tuple[int, ...]:
    """(*shape[:-1], ceil(shape[-1] / block)): one scale per block."""
    shape = tuple(shape)
    if not shape:
        raise ValueError("a quantized leaf has at least one dimension, not shape ()")
    if block < 1:
        raise ValueError(f"{block=} must be a positive number of elements")
    return (*shape[:-1], -(-shape[-1] // block))


def _blocks(x, block: int) -> jax.Array:
    """(..., n) -> (..., ceil(n / block), block), the tail block zero-padded."""
    *lead, n = jnp.shape(x)
    count = scale_shape(jnp.shape(x), block)[-1]
    padded = jnp.pad(x, [(0, 0)] * len(lead) + [(0, count * block - n)])
    return padded.reshape(*lead, count, block)


def _unblocks(x, n: int) -> jax.Array:
    """The inverse of `_blocks`: (..., count, block) -> (..., n)."""
    return x.reshape(*x.shape[:-2], -1)[..., :n]


def block_absmax(x, block: int = QUANTIZATION_BLOCK) -> jax.Array:
    """max |x| over each block, float32, of shape `scale_shape`: NaN if the
    block holds one, float32 subnormals counting as 0. On the bits: for
    non-negative floats, integer order is float order (NaN above inf)."""
    raw = _bits(x) & _MAGNITUDE
    raw = jnp.where(_biased_exponent(raw) == 0, 0, raw)
    absmax = jnp.max(_blocks(raw, block), axis=-1, initial=0)
    return jax.lax.bitcast_convert_type(absmax, jnp.float32)


def block_scales(x, code_map: CodeMap, block: int = QUANTIZATION_BLOCK) -> jax.Array:
    """Per block, the smallest power of two s with max |x| <= top * s; 0 for
    an all-zero block; +inf where max |x| is NaN, inf, or above top * 2^127
    (such a block reads back as NaN).

    On the bits of a = `block_absmax`: s's exponent is a's after a is rounded
    up to the top binade's mantissa bits (t = m, or m - 1 for a linear map):
    add 2^(23 - t) - 1 to a's bits and keep the exponent field.
    """
    raw = jnp.minimum(_bits(block_absmax(x, block)), _INFINITY)  # NaN: inf.
    rounding = 2 ** (_MANTISSA_BITS - code_map.top_mantissa_bits) - 1
    field = jnp.minimum((raw + rounding) >> _MANTISSA_BITS, _INFINITE_EXPONENT)
    field = jnp.where(raw == 0, 0, field)
    return jax.lax.bitcast_convert_type(field << _MANTISSA_BITS, jnp.float32)


def _scale_exponents(scales, n: int, block: int) -> jax.Array:
    """K = log2(scale) of each element's block, int32, in the leaf's shape
    (-127 for a zero scale, 128 for inf)."""
    exponent = _biased_exponent(_bits(scales)) - _EXPONENT_BIAS
    return _unblocks(jnp.repeat(exponent[..., None], block, axis=-1), n)


def quantize(
    x,
    code_map: CodeMap,
    rounding: str = "nearest",
    bits=None,
    block: int = QUANTIZATION_BLOCK,
) -> tuple[jax.Array, jax.Array]:
    """(codes, scales) of x (float32): scales = `block_scales`, codes =
    `encode(x / scale)` (exact, scale being a power of two: computed on the
    exponent, never as a float32 subnormal), 0 where the scale is 0 or inf.
    `bits` (uint32, x's shape) for stochastic rounding: e.g.
    `random_bits(stream_key(seed, count, leaf, array), x.shape)`."""
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding is one of {ROUNDINGS}, not {rounding!r}")
    if rounding == "stochastic" and bits is None:
        raise ValueError("stochastic rounding needs `bits`")
    x = jnp.asarray(x, jnp.float32)
    scales = block_scales(x, code_map, block)
    exponent = _scale_exponents(scales, x.shape[-1], block)
    codes = _scaled_codes(x, exponent, code_map, rounding, bits)
    finite = (exponent > -_EXPONENT_BIAS) & (exponent <= _EXPONENT_BIAS)
    return jnp.where(finite, codes, jnp.zeros_like(codes)), scales


def dequantize(
    codes, scales, code_map: CodeMap, block: int = QUANTIZATION_BLOCK
) -> jax.Array:
    """value(code) * scale, float32: exact, 0 for a zero scale, NaN for an
    infinite one. A value rounded up reads back at or above x."""
    exponent = _scale_exponents(jnp.asarray(scales), jnp.shape(codes)[-1], block)
    values = _scaled_values(codes, exponent, code_map)
    return jnp.where(exponent > _EXPONENT_BIAS, jnp.nan, values)


def quantizes(shape, min_size: int = MIN_QUANTIZED_SIZE) -> bool:
    """Whether a leaf of `shape` is stored quantized: at least `min_size`
    elements and a last dimension of at least 2 (a 1-element block costs 5
    bytes where float32 costs 4). Other leaves keep float32 moments."""
    shape = tuple(shape)
    return bool(shape) and math.prod(shape) >= min_size and shape[-1] >= 2
