"""The package's stochastic rounding and random bits equal the spec's, bit
for bit, on every float32 pattern (`pallas_amsgrad._rounding` is what every
implementation runs; `amsgrad_spec.rounding` states it independently).

End to end the implementations are compared with the spec within a 16-bit
ULP (their float32 values may differ in the last bit before rounding); here
the rounding itself has no such slack.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import amsgrad_spec as spec
from pallas_amsgrad import _rounding

UINT32 = st.integers(0, 2**32 - 1)


def _patterns(data, n=256):
    """float32 values from any bit pattern (NaN, inf, subnormals, zeros of
    both signs, and the float16 and bfloat16 edges), with random bits."""
    raw = data.draw(st.lists(UINT32, min_size=n, max_size=n))
    edges = [0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x00000001]
    edges += [0x33800000, 0x33000000, 0x38800000, 0x387FFFFF, 0x477FE000]
    edges += [0x477FF000, 0x477FEFFF, 0x7F7F8000, 0x7F7FFFFF, 0x3F800001]
    raw = np.array(raw + edges, np.uint32)
    bits = np.array(data.draw(st.lists(UINT32, min_size=len(raw), max_size=len(raw))))
    return jnp.asarray(raw.view(np.float32)), jnp.asarray(bits.astype(np.uint32))


@pytest.mark.parametrize(
    "dtype", [jnp.bfloat16, jnp.float16], ids=lambda d: jnp.dtype(d).name
)
@given(data=st.data())
def test_stochastic_round_equals_the_spec(dtype, data):
    x, bits = _patterns(data)
    got = np.asarray(_rounding.stochastic_round(x, dtype, bits))
    want = np.asarray(spec.stochastic_round(x, dtype, bits))
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))


@pytest.mark.parametrize(
    "dtype", [jnp.bfloat16, jnp.float16], ids=lambda d: jnp.dtype(d).name
)
def test_every_fraction_and_every_threshold(dtype):
    """Each dropped fraction f of one binade against random tops just below,
    at and above it: where `<` meets `<=`."""
    keep = 16 if dtype == jnp.bfloat16 else 13
    fractions = np.arange(0, 2**keep, 7, dtype=np.uint32)
    x = (np.uint32(0x3F800000) | fractions).view(np.float32)
    for offset in (-1, 0, 1):
        tops = (fractions.astype(np.int64) + offset) % 2**keep
        bits = (tops.astype(np.uint32) << np.uint32(32 - keep)) | np.uint32(0x5A5A)
        got = np.asarray(_rounding.stochastic_round(jnp.asarray(x), dtype, bits))
        want = np.asarray(spec.stochastic_round(jnp.asarray(x), dtype, bits))
        np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))


@pytest.mark.parametrize(
    "dtype", [jnp.bfloat16, jnp.float16], ids=lambda d: jnp.dtype(d).name
)
def test_every_binade_around_float16s_subnormals(dtype):
    """Values of each binade from 2^-27 to 2^-12 (float16's subnormals drop
    one more bit per binade below 2^-14), both signs, random mantissas and
    bits; below 2^-24, random bits equal to the value's; float32's smallest
    normals and its subnormals with random bits 0."""
    rng = np.random.default_rng(3)
    exponents = np.repeat(np.arange(100, 116, dtype=np.uint32), 64)
    mantissas = rng.integers(0, 2**23, exponents.size, dtype=np.uint32)
    signs = rng.integers(0, 2, exponents.size, dtype=np.uint32) << np.uint32(31)
    x = (signs | exponents << np.uint32(23) | mantissas).view(np.float32)
    bits = rng.integers(0, 2**32, exponents.size, dtype=np.uint32)
    # Below 2^-24, |x| * 2^48 against top 24 bits equal to it: toward zero.
    whole = rng.integers(1, 2**24, 64, dtype=np.uint32)
    # float32's smallest normals and subnormals with top bits 0: away for
    # normals (|x| * 2^48 > 0), never for subnormals.
    edge = rng.integers(1, 2**24, 64, dtype=np.uint32).view(np.float32)
    x = np.concatenate([x, whole * np.float32(2.0**-48), edge, -edge])
    bits = np.concatenate([bits, whole << np.uint32(8), np.zeros(128, np.uint32)])
    x, bits = jnp.asarray(x), jnp.asarray(bits)
    got = np.asarray(_rounding.stochastic_round(x, dtype, bits))
    want = np.asarray(spec.stochastic_round(x, dtype, bits))
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))


@given(seed=UINT32, count=st.integers(0, 2**31 - 1), path=st.text(max_size=20))
def test_stream_keys_equal_the_spec(seed, count, path):
    keys = _rounding.stream_keys(seed, jnp.int32(count), path)
    leaf = spec.leaf_id(path)
    assert [int(k) for k in keys] == [
        int(spec.stream_key(seed, count, leaf, array))
        for array in (spec.PARAM, spec.MU, spec.NU, spec.NU_MAX)
    ]


def test_stream_keys_take_python_ints_modulo_2_32():
    """Seeds and counts given as Python ints outside uint32 (negative, past
    2^32) are taken modulo 2^32, as the spec takes them."""
    for seed, count in [(-1, 2**32 + 3), (2**32 + 7, -5), (-(2**40), 2**33)]:
        keys = _rounding.stream_keys(seed, count, "['w']")
        leaf = spec.leaf_id("['w']")
        assert [int(k) for k in keys] == [
            int(spec.stream_key(seed, count, leaf, array))
            for array in (spec.PARAM, spec.MU, spec.NU, spec.NU_MAX)
        ], (seed, count)


def test_a_shards_flat_index_is_its_place_in_the_whole_leaf():
    """`Streams.flat_index` of the shard at (2, 4) of a (6, 8, 5) leaf split
    3 x 2 over its first two dims is that shard of the whole leaf's flat
    index; its `base` is the shard's first element; it is two runs."""
    shape, local = (6, 8, 5), (2, 4, 5)
    whole = np.arange(np.prod(shape), dtype=np.uint32).reshape(shape)
    streams = _rounding.Streams(jnp.zeros((1, 4), jnp.uint32), ((2, 4, 0),), (shape,))
    np.testing.assert_array_equal(streams.flat_index(0, local), whole[2:4, 4:8, :])
    assert int(streams.base(0)) == whole[2, 4, 0]
    Run = _rounding.Run
    assert _rounding.runs(local, shape) == (Run(2, 40), Run(20, 1))
    assert _rounding.runs((2, 8, 5), shape) == (Run(80, 1),)  # Contiguous.
    assert _rounding.runs((1, 4, 5), shape) == (Run(20, 1),)
    assert _rounding.runs((6, 8, 1), shape) == (Run(48, 5),)
    assert _rounding.runs(local, shape, dims=1) == (Run(2, 40),)
    # Three runs: every dim split.
    shape, local, start = (4, 6, 4), (2, 3, 2), (2, 3, 2)
    whole = np.arange(np.prod(shape), dtype=np.uint32).reshape(shape)
    shard_runs = _rounding.runs(local, shape)
    assert shard_runs == (Run(2, 24), Run(3, 4), Run(2, 1))
    offsets = _rounding.whole_offset(jnp.arange(12, dtype=jnp.uint32), shard_runs)
    window = whole[2:4, 3:6, 2:4].reshape(-1)
    np.testing.assert_array_equal(whole[start] + offsets, window)


def test_flat_indices_of_leaves_past_2_32_elements_wrap():
    """A leaf of 3 x (2^32 + 5) elements (its shape only: nothing is
    allocated), shard at row 1: flat indices modulo 2^32, as the spec's
    uint32 index arithmetic wraps."""
    shape = (3, 2**32 + 5)
    streams = _rounding.Streams(jnp.zeros((1, 4), jnp.uint32), ((1, 0),), (shape,))
    assert int(streams.base(0)) == 5  # (2^32 + 5) mod 2^32.
    np.testing.assert_array_equal(streams.flat_index(0, (1, 4)), [[5, 6, 7, 8]])
    streams = _rounding.Streams(jnp.zeros((1, 4), jnp.uint32), ((2, 3),), (shape,))
    assert int(streams.base(0)) == 13  # 2 (2^32 + 5) + 3 mod 2^32.


@given(data=st.data())
def test_whole_offset_places_every_shard_element(data):
    """For any even split of any leaf of up to 5 dims, `base` plus
    `whole_offset` of each element's flat index in the shard (what the
    kernels compute from their 128-lane rows) is its index in the whole."""
    shape = data.draw(st.lists(st.integers(1, 6), min_size=1, max_size=5))
    ways = [
        data.draw(st.sampled_from([w for w in range(1, n + 1) if n % w == 0]))
        for n in shape
    ]
    local = [n // w for n, w in zip(shape, ways, strict=True)]
    starts = [
        data.draw(st.integers(0, w - 1)) * n for w, n in zip(ways, local, strict=True)
    ]
    whole = np.arange(np.prod(shape), dtype=np.uint32).reshape(shape)
    window = tuple(slice(i, i + n) for i, n in zip(starts, local, strict=True))
    streams = _rounding.Streams(
        jnp.zeros((1, 4), jnp.uint32), (tuple(starts),), (tuple(shape),)
    )
    flat = jnp.arange(np.prod(local), dtype=jnp.uint32)
    offsets = _rounding.whole_offset(flat, _rounding.runs(local, shape))
    np.testing.assert_array_equal(streams.base(0) + offsets, whole[window].reshape(-1))


def test_store_hashes_each_outputs_key_with_the_index():
    """`store` rounds output j by mix32(keys[j] ^ mix32(index)), the spec's
    `random_bits` of that key, and leaves the others to nearest."""
    x = jnp.linspace(-3, 3, 200, dtype=jnp.float32).reshape(2, 100)
    keys = [spec.stream_key(9, 4, 77, array) for array in range(4)]
    index = jnp.arange(200, dtype=jnp.uint32).reshape(2, 100)
    dtypes = [jnp.float32, jnp.bfloat16, jnp.float16, jnp.bfloat16]
    outputs = [x * (1 + j / 3) for j in range(4)]
    got = _rounding.store(outputs, dtypes, (False, True, True, True), keys, index)
    assert jax.tree.map(lambda a: a.dtype, list(got)) == dtypes
    np.testing.assert_array_equal(got[0], outputs[0])
    for j in (1, 2, 3):
        want = spec.stochastic_round(
            outputs[j], dtypes[j], spec.random_bits(keys[j], x.shape)
        )
        np.testing.assert_array_equal(
            np.asarray(got[j]).view(np.uint16), np.asarray(want).view(np.uint16)
        )
