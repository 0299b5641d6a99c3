"""Stochastic rounding to 16 bits, and the counter-based random bits behind it.

Not in optax. A value the step stores in bfloat16 or float16 can be rounded
stochastically instead of to nearest: to one of its two neighbours, the one
away from zero with probability equal to the value's fraction of the gap
between them, so that the rounding is unbiased and small updates are not
lost on average.

The random bits are a pure function of (seed, step count, leaf, array,
element index): no generator state, so a step is reproducible and every
implementation (this spec, the XLA path, the TPU and GPU kernels, sharded or
not) can compute the same bits for the same element. A leaf is named by its
key path rather than its place in the tree, so adding a leaf to a model does
not change the bits of the others.
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp

# float32's layout: 23 mantissa bits below an 8-bit exponent and the sign.
_MANTISSA_BITS = 23
_SIGN = 0x80000000
_MAGNITUDE = 0x7FFFFFFF
# float16's smallest normal exponent (-14), biased as float32's (+127).
_FLOAT16_MIN_NORMAL_EXPONENT = 113
# Below float16's smallest subnormal, 2**-24: float32 exponents under 103.
_FLOAT16_SUBNORMAL_EXPONENT = 103


def mix32(x: jax.Array) -> jax.Array:
    """murmur3's 32-bit finalizer (fmix32), on uint32: a bijection whose every
    output bit depends on every input bit.

        x ^= x >> 16; x *= 0x85EBCA6B; x ^= x >> 13; x *= 0xC2B2AE35; x ^= x >> 16
    """
    x = jnp.asarray(x, jnp.uint32)
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


# The arrays a step can round, each with a stream of its own: `array` below.
PARAM, MU, NU, NU_MAX = range(4)


def leaf_id(path: str) -> int:
    """The leaf's name in its stream key: CRC-32 of the UTF-8 of its key path
    as `jax.tree_util.keystr` spells it, e.g. "['dense']['w']"."""
    return zlib.crc32(path.encode())


def stream_key(seed, count, leaf, array) -> jax.Array:
    """k = mix32(mix32(mix32(mix32(seed) ^ count) ^ leaf) ^ array): one stream
    of bits per (seed, step count, `leaf_id`, array: PARAM, MU, NU or
    NU_MAX), each taken modulo 2**32. The count is the step's own (the state's
    count after the increment)."""
    key = mix32(_as_uint32(seed))
    key = mix32(key ^ _as_uint32(count))
    key = mix32(key ^ _as_uint32(leaf))
    return mix32(key ^ _as_uint32(array))


def _as_uint32(value) -> jax.Array:
    """An integer modulo 2**32, as uint32 (a Python int of any size too)."""
    if isinstance(value, int):
        return jnp.uint32(value % 2**32)
    return jnp.asarray(value).astype(jnp.uint32)


def random_bits(key, shape) -> jax.Array:
    """b[i] = mix32(k ^ mix32(i)), uint32, for each element's flat index i in
    its whole leaf (row-major; leaves of up to 2**32 elements)."""
    size = 1
    for dim in shape:
        size *= dim
    index = jnp.arange(size, dtype=jnp.uint32).reshape(shape)
    return mix32(jnp.asarray(key, jnp.uint32) ^ mix32(index))


def stochastic_round(x, dtype, bits) -> jax.Array:
    """x rounded to the 16-bit `dtype` stochastically, unbiased, by `bits`
    (uint32, one per element).

    x (taken as float32) goes to its neighbour toward zero or the one away
    from zero (inf past the largest finite value), the latter with
    probability equal to x's fraction of the gap. On x's magnitude bits M:
    with k the count of M's low bits below `dtype`'s spacing at |x| (16 for
    bfloat16, all of whose values, subnormals too, are float32's with 16 low
    bits zero; 13 for float16, plus one per binade below its smallest normal
    2**-14), the k bits f = M mod 2**k are dropped and 2**k is added when
    r < f, r being the top k bits of `bits`: P(away) = f / 2**k exactly.

    float16 has two more cases. Below its smallest subnormal 2**-24, x goes
    to 0 or to 2**-24, away when r < |x| * 2**48 with r the top 24 bits (the
    probability rounded up to a multiple of 2**-24), and float32 subnormals
    go to 0. NaN and inf round as a cast does.
    """
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"stochastic rounding is to bfloat16 or float16, not {dtype}")
    x = jnp.asarray(x, jnp.float32)
    bits = jnp.asarray(bits, jnp.uint32)
    raw = jax.lax.bitcast_convert_type(x, jnp.uint32)
    sign, magnitude = raw & jnp.uint32(_SIGN), raw & jnp.uint32(_MAGNITUDE)
    exponent = magnitude >> _MANTISSA_BITS
    if dtype == jnp.bfloat16:
        dropped = jnp.full_like(magnitude, 16)
    else:
        below_normal = jnp.maximum(
            jnp.int32(_FLOAT16_MIN_NORMAL_EXPONENT) - exponent.astype(jnp.int32), 0
        )
        dropped = jnp.minimum(13 + below_normal, _MANTISSA_BITS).astype(jnp.uint32)
    gap = jnp.uint32(1) << dropped
    fraction = magnitude & (gap - 1)
    away = (bits >> (32 - dropped)) < fraction
    rounded = magnitude - fraction + jnp.where(away, gap, jnp.uint32(0))
    result = jax.lax.bitcast_convert_type(sign | rounded, jnp.float32)
    if dtype == jnp.float16:
        smallest = jnp.float32(2.0**-24)
        tiny_away = ((bits >> 8).astype(jnp.float32) < jnp.abs(x) * 2.0**48) & (
            exponent > 0
        )
        tiny = jnp.copysign(jnp.where(tiny_away, smallest, 0), x)
        result = jnp.where(exponent < _FLOAT16_SUBNORMAL_EXPONENT, tiny, result)
    return jnp.where(jnp.isfinite(x), result, x).astype(dtype)
