"""The spec's stochastic rounding and its counter-based random bits: the hash
against a plain-Python murmur3 finalizer, rounding that always lands on a
neighbour, keeps exact values, has exactly the intended probability, and is
unbiased within a bound derived from the sample size."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import amsgrad_spec as spec

DTYPES = ["bfloat16", "float16"]
UINT32 = st.integers(0, 2**32 - 1)


def fmix32(h: int) -> int:
    """murmur3's finalizer, written from its published definition."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) % 2**32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) % 2**32
    return h ^ (h >> 16)


@given(st.lists(UINT32, min_size=1, max_size=64))
def test_mix32_is_murmur3_fmix32(values):
    got = spec.mix32(np.array(values, np.uint32))
    assert got.dtype == jnp.uint32
    assert [int(v) for v in got] == [fmix32(v) for v in values]
    assert int(spec.mix32(0xDEADBEEF)) == fmix32(0xDEADBEEF)  # As uint32.


def test_random_bits_are_the_elements_flat_index_hashed():
    key = spec.stream_key(7, 3, 2, spec.MU)
    assert int(key) == fmix32(fmix32(fmix32(fmix32(7) ^ 3) ^ 2) ^ spec.MU)
    bits = spec.random_bits(key, (3, 5))
    assert bits.shape == (3, 5) and bits.dtype == jnp.uint32
    expected = [fmix32(int(key) ^ fmix32(i)) for i in range(15)]
    assert [int(b) for b in bits.reshape(-1)] == expected
    # An element's bits depend on its flat index only, not on the shape.
    np.testing.assert_array_equal(spec.random_bits(key, (15,)), bits.reshape(-1))
    # A key is taken as uint32, a Python int past 2**31 too.
    high = [int(b) for b in spec.random_bits(0xDEADBEEF, (4,))]
    assert high == [fmix32(0xDEADBEEF ^ fmix32(i)) for i in range(4)]


def test_streams_differ_by_seed_count_leaf_and_array():
    keys = [
        spec.stream_key(seed, count, leaf, array)
        for seed in (0, 1)
        for count in (1, 2)
        for leaf in (0, 1)
        for array in (spec.PARAM, spec.MU, spec.NU, spec.NU_MAX)
    ]
    streams = {tuple(np.asarray(spec.random_bits(k, (64,)))) for k in keys}
    assert len(streams) == len(keys)
    # Each part is taken modulo 2**32: a seed of 2**32 + 1 or -1 too.
    assert int(spec.stream_key(2**32 + 1, 2, 0, spec.MU)) == int(
        spec.stream_key(1, 2, 0, spec.MU)
    )
    assert int(spec.stream_key(-1, 2, 0, spec.MU)) == int(
        spec.stream_key(2**32 - 1, 2, 0, spec.MU)
    )


def test_a_leaf_is_named_by_the_crc32_of_its_path():
    # CRC-32's published check value, and the empty string's.
    assert spec.leaf_id("123456789") == 0xCBF43926
    assert spec.leaf_id("") == 0
    assert spec.leaf_id("['a']") != spec.leaf_id("['b']")


def test_every_bit_is_a_fair_coin():
    """Each of the 32 bit positions over 2**16 consecutive elements: set in
    half of them within 6 standard deviations (sqrt(n) / 2)."""
    n = 2**16
    bits = np.asarray(spec.random_bits(spec.stream_key(0, 1, 0, spec.PARAM), (n,)))
    ones = [(bits >> b & 1).sum() for b in range(32)]
    bound = 6 * math.sqrt(n) / 2
    assert all(abs(count - n / 2) <= bound for count in ones), ones


def neighbours(x: float, dtype: str) -> tuple[float, float]:
    """(toward zero, away from zero) neighbours of float32 x in `dtype`, from
    round-to-nearest and nextafter, in float64; equal when x is exact."""
    nearest = jnp.asarray(x, jnp.float32).astype(dtype)
    candidates = [
        float(nearest),
        float(jnp.nextafter(nearest, jnp.asarray(np.inf, dtype))),
        float(jnp.nextafter(nearest, jnp.asarray(-np.inf, dtype))),
    ]
    below = max((c for c in candidates if abs(c) <= abs(x) and c * x >= 0), key=abs)
    above = [c for c in candidates if abs(c) >= abs(x) and c * x >= 0]
    if x == below:
        return below, below
    return below, min(above, key=abs) if above else math.copysign(math.inf, x)


def finite_floats(dtype):
    # float32 values within the target's range, subnormals of both included.
    top = float(jnp.finfo(dtype).max)
    return st.floats(-top, top, width=32, allow_subnormal=True)


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_lands_on_a_neighbour_and_keeps_exact_values(dtype, data):
    values = data.draw(st.lists(finite_floats(dtype), min_size=1, max_size=16))
    bits = data.draw(st.lists(UINT32, min_size=len(values), max_size=len(values)))
    got = spec.stochastic_round(
        np.array(values, np.float32), dtype, np.array(bits, np.uint32)
    )
    assert got.dtype == jnp.dtype(dtype)
    for x, y in zip(np.float32(values), np.asarray(got, np.float64), strict=True):
        x = float(x)
        if dtype == "float16" and 0 < abs(x) < jnp.finfo(jnp.float32).tiny:
            assert y == 0, (x, y)  # float32 subnormals: 0 in float16.
            continue
        below, above = neighbours(x, dtype)
        assert y in (below, above), (x, y, below, above)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_inf_and_zeros_round_as_a_cast(dtype):
    x = jnp.array([np.nan, np.inf, -np.inf, 0.0, -0.0], jnp.float32)
    for bits in (0, 2**32 - 1, 0x12345678):
        got = spec.stochastic_round(x, dtype, jnp.full(x.shape, bits, jnp.uint32))
        np.testing.assert_array_equal(
            np.asarray(got).view(np.uint16), np.asarray(x.astype(dtype)).view(np.uint16)
        )


# (float32 value, dtype, dropped bits k): ordinary, negative, subnormal in
# the target, just below the largest finite value, and one rounding to inf.
EXACT_CASES = [
    (1 + 2**-9 + 2**-20, "bfloat16", 16),
    (-3.14159, "bfloat16", 16),
    (2.0**-130 * 1.3, "bfloat16", 16),  # A bfloat16 (and float32) subnormal.
    (3.3e38, "bfloat16", 16),
    (1 / 3, "float16", 13),
    (-1234.567, "float16", 13),
    (2.0**-16 * 1.7, "float16", 15),  # float16 subnormal: 2 binades below.
    (65510.0, "float16", 13),  # Between the largest finite value and inf.
]


@pytest.mark.parametrize("x, dtype, dropped", EXACT_CASES, ids=str)
def test_probability_of_rounding_away_is_exactly_the_fraction(x, dtype, dropped):
    """Over all 2**k values of the top k random bits, x rounds away from zero
    for exactly f of them, f being x's k dropped bits: P = f / 2**k."""
    x32 = np.float32(x)
    magnitude = int(np.array(abs(x32), np.float32).view(np.uint32))
    fraction = magnitude % 2**dropped
    assert 0 < fraction < 2**dropped  # The cases are not exact.
    top = np.arange(2**dropped, dtype=np.uint64) << np.uint64(32 - dropped)
    got = np.asarray(
        spec.stochastic_round(np.full(top.shape, x32), dtype, top.astype(np.uint32)),
        np.float64,
    )
    below, above = neighbours(float(x32), dtype)
    assert set(np.unique(got)) == {below, above}
    assert int((got == above).sum()) == fraction


@pytest.mark.parametrize("x", [2.0**-30, -(2.0**-30) * 1.3])
def test_below_float16s_smallest_subnormal_the_bound_is_exact(x):
    """Below 2**-24, x goes to +-2**-24 exactly when the top 24 random bits
    r < |x| * 2**48: at r = ceil(|x| * 2**48) - 1 it does, at the next r not
    (an integer bound included)."""
    bound = math.ceil(abs(np.float32(x)) * 2.0**48)
    r = np.array([bound - 1, bound], np.uint32) << np.uint32(8)
    got = spec.stochastic_round(np.full(2, x, np.float32), "float16", r)
    expected = np.float16([math.copysign(2.0**-24, x), math.copysign(0.0, x)])
    np.testing.assert_array_equal(
        np.asarray(got).view(np.uint16), expected.view(np.uint16)
    )


def test_the_edges_of_float16s_range_below_its_normals():
    """float32 subnormals go to +-0 whatever the bits; 2**-126 (float32's
    smallest normal) to 2**-24 at r = 0 only; float16's lowest binade
    [2**-24, 2**-23) rounds between its neighbours as any subnormal does."""
    cases = [  # (x, bits, expected)
        (1e-40, 0, 0.0),
        (-1e-45, 0, -0.0),
        (1e-40, 2**32 - 1, 0.0),
        (2.0**-126, 0, 2.0**-24),
        (2.0**-126, 1 << 8, 0.0),
        (1.5 * 2.0**-24, 0, 2.0**-23),
        (-1.5 * 2.0**-24, 2**32 - 1, -(2.0**-24)),
    ]
    x, bits, expected = (np.array(column) for column in zip(*cases, strict=True))
    got = spec.stochastic_round(x.astype(np.float32), "float16", bits.astype(np.uint32))
    np.testing.assert_array_equal(
        np.asarray(got).view(np.uint16), expected.astype(np.float16).view(np.uint16)
    )


# Values to average, with bits from the counter-based stream: each kind of
# range, and float16's values below its smallest subnormal.
UNBIASED_CASES = [
    (1.0 + 2**-9, "bfloat16"),
    (-0.1, "bfloat16"),
    (7.3e-39, "bfloat16"),  # float32 and bfloat16 subnormal.
    (0.1, "float16"),
    (-3e-6, "float16"),  # float16 subnormal.
    (1e-8, "float16"),  # Below float16's smallest subnormal, 2**-24.
]


@pytest.mark.parametrize("x, dtype", UNBIASED_CASES, ids=str)
def test_unbiased_within_the_sample_bound(x, dtype):
    """The mean of n = 2**16 rounded copies (one stream, consecutive element
    indices) is within 6 standard deviations of x: |mean - x| <=
    6 * gap * sqrt(p (1 - p) / n), plus 2**-24 of the gap below float16's
    subnormals (where the probability is rounded up to a multiple of it)."""
    n = 2**16
    x32 = float(np.float32(x))
    bits = spec.random_bits(spec.stream_key(0, 1, 3, spec.NU), (n,))
    got = np.asarray(
        spec.stochastic_round(jnp.full((n,), x32, jnp.float32), dtype, bits),
        np.float64,
    )
    below, above = neighbours(x32, dtype)
    gap = abs(above - below)
    p = abs(x32 - below) / gap
    bound = 6 * gap * math.sqrt(p * (1 - p) / n) + gap * 2.0**-24
    assert abs(got.mean() - x32) <= bound, (got.mean(), x32, bound)
    assert set(np.unique(got)) == {below, above}


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_never_below_a_representable_lower_bound(dtype, data):
    """Stochastic rounding of x >= m, m representable, is >= m: why nu_max,
    rounded this way, never decreases."""
    old = np.asarray(
        data.draw(st.lists(finite_floats(dtype), min_size=1, max_size=16)), np.float32
    )
    old = np.abs(np.asarray(jnp.asarray(old).astype(dtype), np.float32))
    increase = data.draw(
        st.lists(st.floats(0, 1e3, width=32), min_size=len(old), max_size=len(old))
    )
    x = np.maximum(old, old * np.float32(1) + np.asarray(increase, np.float32))
    bits = spec.random_bits(
        spec.stream_key(data.draw(UINT32), 1, 0, spec.PARAM), x.shape
    )
    got = np.asarray(spec.stochastic_round(x, dtype, bits), np.float64)
    assert (got >= old).all(), (x, old, got)


def test_other_dtypes_are_refused():
    with pytest.raises(ValueError, match="bfloat16 or float16, not float32"):
        spec.stochastic_round(jnp.ones(2), jnp.float32, jnp.zeros(2, jnp.uint32))


def test_jit_eager_and_x64_agree():
    """The same bits jitted, eagerly, under x64 from float64 input (taken as
    float32), and from the random bits as int64 (taken as uint32)."""
    x = jnp.linspace(-3, 3, 1001, dtype=jnp.float32)
    bits = spec.random_bits(spec.stream_key(5, 9, 1, spec.NU_MAX), x.shape)
    for dtype in DTYPES:
        eager = spec.stochastic_round(x, dtype, bits)
        jitted = jax.jit(spec.stochastic_round, static_argnums=1)(x, dtype, bits)
        with jax.enable_x64(True):
            wide = spec.stochastic_round(np.asarray(x, np.float64), dtype, bits)
        signed = spec.stochastic_round(x, dtype, np.asarray(bits).astype(np.int64))
        for other in (jitted, wide, signed):
            assert other.dtype == eager.dtype
            np.testing.assert_array_equal(
                np.asarray(eager).view(np.uint16), np.asarray(other).view(np.uint16)
            )


def test_a_stored_leafs_elements_round_by_their_own_bits():
    """`store` rounds each element of a 16-bit leaf by its own random bits:
    of 4096 equal values a quarter of the way from 1 to the next bfloat16,
    about a quarter round up (one bit for the whole leaf would move all or
    none)."""
    hp = spec.Hyperparams(0.1, stochastic_rounding=True, seed=3)
    x = jnp.full((4096,), 1 + 2.0**-9, jnp.float32)
    stored = spec.store(x, jnp.bfloat16, hp, jnp.int32(1), "['w']", spec.MU)
    assert set(np.unique(np.asarray(stored, np.float32))) == {1.0, 1 + 2.0**-7}
    up = int(np.sum(np.asarray(stored, np.float32) > 1))
    n, p = x.size, 0.25
    assert abs(up - n * p) <= 6 * math.sqrt(n * p * (1 - p)), up
