"""Stochastic rounding of the values a step stores in 16 bits.

With `stochastic_rounding=True`, each value stored in bfloat16 or float16
(the param in `step`; mu, nu and nu_max) goes to one of its two neighbours,
the one away from zero with probability equal to its fraction of the gap, so
the rounding is unbiased and small updates are not lost on average.

The random bits are a counter-based hash, not a generator's state: for an
element at flat index i of a leaf at key path `path`,

    key  = mix32(mix32(mix32(mix32(seed) ^ count) ^ crc32(path)) ^ array)
    bits = mix32(key ^ mix32(i))

with `array` the output's position (PARAM, MU, NU, NU_MAX), `count` the
step's own (after the increment) and i the element's place in the whole leaf,
also when a device holds only a shard of it. The spec (`amsgrad_spec`) states
the same function; every implementation computes it per element, in integer
ops that Mosaic TPU, Mosaic GPU and XLA all lower.

Its derivative is straight-through, a plain cast's: under `jax.grad` or
`jax.jvp` a stochastically rounded store differentiates as one rounded to
nearest, on every implementation (`straight_through_round`).
"""

from __future__ import annotations

import functools
import math
import operator
import zlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

# Each output's stream, by its position in `_math.Operands`' outputs.
PARAM, MU, NU, NU_MAX = range(4)
SIXTEEN_BITS = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# A leaf's row of `Streams.kernel_table`: its four keys, then its base.
TABLE_WIDTH = 5

_SIGN = 0x80000000
_MAGNITUDE = 0x7FFFFFFF
_MANTISSA_BITS = 23
_EXPONENT_ALL_ONES = 0xFF  # inf and NaN.
# float16's smallest normal, 2**-14, and smallest subnormal, 2**-24, as
# float32 biased exponents.
_FLOAT16_MIN_NORMAL_EXPONENT = 113
_FLOAT16_SUBNORMAL_EXPONENT = 103
_FLOAT16_BITS_KEPT = 10  # float16's mantissa: 13 of float32's 23 dropped.


class Streams(NamedTuple):
    """Where a group's random bits come from, per leaf.

    Attributes:
      keys: uint32 (leaves, 4), the stream key of each output position.
      starts: per leaf, per dim, the first index of this device's shard in
        the whole leaf (uint32 scalars; 0 where not sharded).
      shapes: per leaf, the whole leaf's shape (static).
    """

    keys: jax.Array
    starts: tuple[tuple[Any, ...], ...]
    shapes: tuple[tuple[int, ...], ...]

    def base(self, leaf: int) -> jax.Array:
        """The flat index of the shard's first element in the whole leaf."""
        strides = _strides(self.shapes[leaf])
        base = jnp.uint32(0)
        for start, stride in zip(self.starts[leaf], strides, strict=True):
            base = base + jnp.asarray(start, jnp.uint32) * jnp.uint32(stride)
        return base

    def flat_index(self, leaf: int, local_shape: Sequence[int]) -> jax.Array:
        """uint32 of `local_shape`: each element's flat index in the whole leaf
        (`base` plus its position in the shard at the whole leaf's strides)."""
        index = jnp.broadcast_to(self.base(leaf), tuple(local_shape))
        for dim, stride in enumerate(_strides(self.shapes[leaf])):
            position = jax.lax.broadcasted_iota(jnp.uint32, tuple(local_shape), dim)
            index = index + position * jnp.uint32(stride)
        return index

    def kernel_table(self) -> jax.Array:
        """uint32 (leaves, 5): each leaf's four keys and its shard's `base`,
        what a kernel reads as scalars."""
        bases = jnp.stack([self.base(k) for k in range(len(self.shapes))])
        return jnp.concatenate([self.keys, bases[:, None]], axis=1)


def _strides(shape: Sequence[int]) -> tuple[int, ...]:
    """Row-major strides, in elements, taken modulo 2**32."""
    return tuple(math.prod(shape[d + 1 :]) % 2**32 for d in range(len(shape)))


class Run(NamedTuple):
    """Dims of a shard that step through its whole leaf at one stride: the
    elements it holds of them, and the whole leaf's stride (in elements) of
    the innermost."""

    size: int
    stride: int


def runs(
    local_shape: Sequence[int], whole_shape: Sequence[int], dims: int | None = None
) -> tuple[Run, ...]:
    """How the shard of `local_shape` sits in its leaf of `whole_shape`, over
    the first `dims` dims (all by default), outermost first.

    A dim the shard holds whole continues the run before it; a split dim
    starts a new one. With its position q in each run, an element lies
    sum(q * stride) past the shard's first element in the whole leaf's flat
    order. A shard that is one run of stride 1 is a contiguous piece of the
    leaf; runs of one element are left out (their q is always 0).
    """
    dims = len(local_shape) if dims is None else dims
    strides = _strides(whole_shape)
    result: list[Run] = []
    for d in range(dims):
        if result and local_shape[d] == whole_shape[d]:
            result[-1] = Run(result[-1].size * local_shape[d], strides[d])
        else:
            result.append(Run(local_shape[d], strides[d]))
    return tuple(run for run in result if run.size != 1)


def whole_offset(local: jax.Array, shard_runs: Sequence[Run]) -> jax.Array:
    """uint32: how far past the shard's first element, in its whole leaf's
    flat order, lies the element at flat index `local` (uint32) of the
    shard. Free for a contiguous shard; one division by a constant per
    further run otherwise (unsigned: every backend lowers it)."""
    if not shard_runs:
        return jnp.zeros_like(local)
    if len(shard_runs) == 1 and shard_runs[0].stride == 1:
        return local
    terms, rest = [], local
    for run in reversed(shard_runs[1:]):  # Innermost first.
        quotient = rest // jnp.uint32(run.size)
        terms.append((rest - quotient * jnp.uint32(run.size)) * jnp.uint32(run.stride))
        rest = quotient
    # The outermost run's position needs no wrap.
    terms.append(rest * jnp.uint32(shard_runs[0].stride))
    return functools.reduce(operator.add, terms)


def mix32(x: jax.Array) -> jax.Array:
    """murmur3's 32-bit finalizer (fmix32) on uint32."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def leaf_id(path: str) -> int:
    """CRC-32 of the leaf's key path (`jax.tree_util.keystr`), as UTF-8."""
    return zlib.crc32(path.encode())


def stream_keys(seed: Any, count: jax.Array, path: str) -> jax.Array:
    """uint32 (4,): the keys of the param (or update), mu, nu and nu_max of
    the leaf at `path`, at step `count`."""
    key = mix32(_as_uint32(seed))
    key = mix32(key ^ _as_uint32(count))
    key = mix32(key ^ jnp.uint32(leaf_id(path)))
    return mix32(key ^ jnp.arange(4, dtype=jnp.uint32))


def _as_uint32(value: Any) -> jax.Array:
    if isinstance(value, int):
        return jnp.uint32(value % 2**32)
    return jnp.asarray(value).astype(jnp.uint32)


def stochastic_round(x: jax.Array, dtype: Any, bits: jax.Array) -> jax.Array:
    """x (taken as float32) rounded to the 16-bit `dtype` by `bits` (uint32):
    with k the low bits of x's magnitude below `dtype`'s spacing at |x| and f
    their value, the magnitude is cut to a multiple of 2**k and 2**k added
    when the top k bits of `bits` are below f, so P(away from zero) = f/2**k.

    k is 16 for bfloat16; 13 for float16, one more per binade below 2**-14
    (at most 23). Below float16's smallest subnormal 2**-24, x goes to 0 or
    2**-24, away when the top 24 bits are below |x| * 2**48; float32
    subnormals go to 0. NaN and inf are cast.
    """
    dtype = jnp.dtype(dtype)
    x = x.astype(jnp.float32)
    raw = jax.lax.bitcast_convert_type(x, jnp.uint32)
    sign = raw & jnp.uint32(_SIGN)
    magnitude = raw & jnp.uint32(_MAGNITUDE)
    exponent = magnitude >> _MANTISSA_BITS
    if dtype == jnp.bfloat16:
        # 16 for every finite value: bfloat16 is float32's top half.
        fraction = magnitude & jnp.uint32(0xFFFF)
        away = (bits >> 16) < fraction
        rounded = (magnitude - fraction) + jnp.where(
            away, jnp.uint32(0x10000), jnp.uint32(0)
        )
    else:
        signed_exponent = jax.lax.bitcast_convert_type(exponent, jnp.int32)
        below_normal = jnp.maximum(_FLOAT16_MIN_NORMAL_EXPONENT - signed_exponent, 0)
        dropped = jnp.minimum(
            _MANTISSA_BITS - _FLOAT16_BITS_KEPT + below_normal, _MANTISSA_BITS
        )
        dropped = jax.lax.bitcast_convert_type(dropped, jnp.uint32)
        gap = jnp.uint32(1) << dropped
        fraction = magnitude & (gap - jnp.uint32(1))
        away = (bits >> (jnp.uint32(32) - dropped)) < fraction
        rounded = (magnitude - fraction) + jnp.where(away, gap, jnp.uint32(0))
    result = jax.lax.bitcast_convert_type(sign | rounded, jnp.float32)
    if dtype == jnp.float16:
        top_24 = jax.lax.bitcast_convert_type(bits >> 8, jnp.int32)
        tiny_away = (top_24.astype(jnp.float32) < jnp.abs(x) * 2.0**48) & (
            exponent > jnp.uint32(0)
        )
        tiny = jnp.where(tiny_away, jnp.float32(2.0**-24), jnp.float32(0))
        tiny = jax.lax.bitcast_convert_type(
            jax.lax.bitcast_convert_type(tiny, jnp.uint32) | sign, jnp.float32
        )
        result = jnp.where(exponent < _FLOAT16_SUBNORMAL_EXPONENT, tiny, result)
    finite = exponent != jnp.uint32(_EXPONENT_ALL_ONES)
    return jnp.where(finite, result, x).astype(dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def straight_through_round(x: jax.Array, dtype: Any, bits: jax.Array) -> jax.Array:
    """`stochastic_round`, differentiated straight through: its derivative is
    that of `x.astype(dtype)`, as if it rounded to nearest. (Its bit
    manipulation would give a zero derivative wherever x is finite.)"""
    return stochastic_round(x, dtype, bits)


@straight_through_round.defjvp
def _straight_through_round_jvp(dtype, primals, tangents):
    x, bits = primals
    x_dot, _ = tangents
    return straight_through_round(x, dtype, bits), x_dot.astype(dtype)


def store(
    outputs: Sequence[jax.Array],
    out_dtypes: Sequence[Any],
    stochastic: Sequence[bool],
    keys: Sequence[jax.Array] | None = None,
    index: Any = None,
    *,
    differentiable: bool = False,
) -> tuple[jax.Array, ...]:
    """Each output rounded once to its dtype: stochastically where
    `stochastic` says so, by the bits of its key (`keys`, uint32 scalars in
    output order) at each element's flat `index` (a uint32 array of the
    outputs' shape, or a callable making one); to nearest elsewhere.

    With `differentiable` (the XLA path) stochastic rounding is
    `straight_through_round`. Kernel bodies leave it off: Mosaic GPU lowers no
    custom_jvp, and a kernel's derivatives are the XLA path's (`_sharding`).
    """
    round_stochastically = (
        straight_through_round if differentiable else stochastic_round
    )
    hashed = None
    results = []
    for j, (value, dtype) in enumerate(zip(outputs, out_dtypes, strict=True)):
        if not stochastic[j]:
            results.append(value.astype(dtype))
            continue
        if hashed is None:
            hashed = mix32(index() if callable(index) else index)
        results.append(round_stochastically(value, dtype, mix32(keys[j] ^ hashed)))
    return tuple(results)
