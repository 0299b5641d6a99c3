"""The spec's 8-bit block quantization: the maps' values by hand and by their
published formula, rounding against a float64 brute force over every code
(nearest really nearest, up the smallest code at or above), zeros kept,
`nu_max` monotone over many steps, the block layout with its tail, and
stochastic rounding that lands on a neighbour, has exactly the intended
probability and is unbiased within a bound derived from the sample size."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import amsgrad_spec as spec

MAPS = {"mu": spec.MU_MAP, "nu": spec.NU_MAP}
# The chosen maps, and others of the family: linear (no exponent bits),
# wide range (E5M2) and an unsigned one with 3 exponent bits.
ALL_MAPS = {
    **MAPS,
    "E0M7": spec.CodeMap(0, 7, signed=True),
    "E5M2": spec.CodeMap(5, 2, signed=True),
    "E0M8": spec.CodeMap(0, 8, signed=False),
    "E3M5": spec.CodeMap(3, 5, signed=False),
}
UINT32 = st.integers(0, 2**32 - 1)

# Jitted, so each shape compiles once as one program: eager jax compiles each
# of the spec's ops apart (test_jit_and_eager_agree checks they agree).
quantize = jax.jit(spec.quantize, static_argnames=("code_map", "rounding", "block"))
dequantize = jax.jit(spec.dequantize, static_argnames=("code_map", "block"))
encode = jax.jit(spec.encode, static_argnames=("code_map", "rounding"))


def published_values(code_map: spec.CodeMap) -> np.ndarray:
    """Every code's value in float64, from the small-float definition: sign
    and magnitude, E = c >> m, M = c mod 2^m, 2^(E - bias) (1 + M / 2^m) or
    2^(1 - bias) M / 2^m for E = 0, bias = 2^e - 1."""
    e, m = code_map.exponent_bits, code_map.mantissa_bits
    bias = 2**e - 1
    magnitudes = []
    for c in range(code_map.max_code + 1):
        exponent, mantissa = c >> m, c % 2**m
        if exponent == 0:
            magnitudes.append(2.0 ** (1 - bias) * mantissa / 2**m)
        else:
            magnitudes.append(2.0 ** (exponent - bias) * (1 + mantissa / 2**m))
    magnitudes = np.array(magnitudes)
    if code_map.signed:
        return np.concatenate([-magnitudes[:0:-1], magnitudes])
    return magnitudes


def as_the_spec_reads(x) -> np.ndarray:
    """x, float32, its subnormals zero: the spec counts them as 0 (as TPUs and
    XLA:CPU flush them)."""
    x = np.asarray(x, np.float32)
    return np.where(np.abs(x) < np.finfo(np.float32).tiny, np.float32(0), x)


def all_codes(code_map: spec.CodeMap) -> np.ndarray:
    low = -code_map.max_code if code_map.signed else 0
    return np.arange(low, code_map.max_code + 1)


# --- The maps. -------------------------------------------------------------------


# (map, code, value) worked by hand from the formula.
HAND_VALUES = [
    ("mu", 0, 0.0),
    ("mu", 1, 2.0**-10),  # The smallest subnormal: 2^(1 - 7) / 2^4.
    ("mu", 15, 15 * 2.0**-10),  # The largest subnormal.
    ("mu", 16, 2.0**-6),  # E = 1: 2^(1 - 7).
    ("mu", 17, 2.0**-6 * (1 + 1 / 16)),
    ("mu", 112, 1.0),  # E = 7 = bias.
    ("mu", 127, 1 + 15 / 16),  # The top: 2 - 2^-4.
    ("mu", -1, -(2.0**-10)),
    ("mu", -112, -1.0),
    ("mu", -127, -(1 + 15 / 16)),
    ("nu", 1, 2.0**-18),  # 2^(1 - 15) / 2^4.
    ("nu", 15, 15 * 2.0**-18),
    ("nu", 16, 2.0**-14),
    ("nu", 17, 2.0**-14 * (1 + 1 / 16)),
    ("nu", 128, 2.0**-7),  # E = 8.
    ("nu", 240, 1.0),  # E = 15 = bias.
    ("nu", 255, 1 + 15 / 16),
]


@pytest.mark.parametrize("name, code, value", HAND_VALUES, ids=str)
def test_decode_hand_worked_values(name, code, value):
    code_map = MAPS[name]
    got = spec.decode(jnp.asarray([code], code_map.dtype), code_map)
    assert got.dtype == jnp.float32
    assert float(got[0]) == value


@pytest.mark.parametrize("name", ALL_MAPS)
def test_every_code_is_the_published_small_float(name):
    code_map = ALL_MAPS[name]
    values = np.asarray(spec.code_values(code_map), np.float64)
    assert values.shape == (255 if code_map.signed else 256,)
    np.testing.assert_array_equal(values, published_values(code_map))
    assert (np.diff(values) > 0).all()  # Codes ordered as their values.
    assert values[-1] == code_map.top


def test_a_linear_map_is_evenly_spaced():
    values = np.asarray(spec.code_values(ALL_MAPS["E0M7"]), np.float64)
    np.testing.assert_array_equal(values, np.arange(-127, 128) / 64)


@pytest.mark.parametrize("name", ALL_MAPS)
@pytest.mark.parametrize("rounding", spec.ROUNDINGS)
def test_every_value_encodes_to_its_own_code(name, rounding):
    code_map = ALL_MAPS[name]
    codes = jnp.asarray(all_codes(code_map), code_map.dtype)
    bits = jnp.full(codes.shape, 2**32 - 1, jnp.uint32)  # Would round away.
    got = encode(spec.decode(codes, code_map), code_map, rounding, bits)
    assert got.dtype == code_map.dtype
    np.testing.assert_array_equal(got, codes)
    if rounding == "nearest":  # The default.
        np.testing.assert_array_equal(
            encode(spec.decode(codes, code_map), code_map), codes
        )


def test_maps_are_8_bits_with_a_mantissa():
    for exponent_bits, mantissa_bits, signed in [
        (3, 4, 1),
        (4, 4, 0),
        (6, 1, 1),
        (0, 8, 0),
    ]:
        code_map = spec.CodeMap(exponent_bits, mantissa_bits, bool(signed))
        assert code_map.max_code == 2 ** (8 - signed) - 1
    with pytest.raises(ValueError, match="8 bits"):
        spec.CodeMap(4, 4, signed=True)
    with pytest.raises(ValueError, match="mantissa"):
        spec.CodeMap(8, 0, signed=False)
    with pytest.raises(ValueError, match="at most 6 exponent bits"):
        spec.CodeMap(7, 1, signed=False)
    with pytest.raises(ValueError, match="rounding is one of"):
        encode(jnp.zeros(2), spec.NU_MAP, "down")
    with pytest.raises(ValueError, match="needs `bits`"):
        encode(jnp.zeros(2), spec.NU_MAP, "stochastic")
    with pytest.raises(ValueError, match="needs `bits`"):
        spec.quantize(jnp.zeros((2, 4)), spec.NU_MAP, "stochastic")
    with pytest.raises(ValueError, match="rounding is one of"):
        spec.quantize(jnp.zeros((2, 4)), spec.NU_MAP, "down")


# --- Rounding against a float64 brute force over every code. ---------------------


def normalized(code_map, data, size=32):
    """`size` values in [-top, top] (or [0, top]), some exact code values,
    float32. A fixed size: eager jax compiles each op once per shape."""
    top = code_map.top
    low = -top if code_map.signed else 0.0
    q = data.draw(
        st.lists(
            st.one_of(
                st.floats(low, top, width=32, allow_subnormal=True),
                st.sampled_from(list(np.asarray(spec.code_values(code_map)))),
            ),
            min_size=size,
            max_size=size,
        )
    )
    return np.array(q, np.float32)


@pytest.mark.parametrize("name", ALL_MAPS)
@given(data=st.data())
def test_nearest_is_the_nearest_code_ties_to_even(name, data):
    code_map = ALL_MAPS[name]
    q = normalized(code_map, data)
    got = np.asarray(encode(q, code_map, "nearest"), np.int64)
    values, codes = published_values(code_map), all_codes(code_map)
    for x, code in zip(as_the_spec_reads(q).astype(np.float64), got, strict=True):
        distance = np.abs(values - x)
        nearest = codes[distance == distance.min()]
        if len(nearest) == 2:  # A tie: the even magnitude code.
            nearest = nearest[nearest % 2 == 0]
        assert code == nearest[0], (x, code, nearest)


@pytest.mark.parametrize("name", ALL_MAPS)
@given(data=st.data())
def test_up_is_the_smallest_code_at_or_above(name, data):
    code_map = ALL_MAPS[name]
    q = normalized(code_map, data)
    got = np.asarray(encode(q, code_map, "up"), np.int64)
    values, codes = published_values(code_map), all_codes(code_map)
    for x, code in zip(as_the_spec_reads(q).astype(np.float64), got, strict=True):
        assert code == codes[values >= x].min(), (x, code)


def magnitudes(signed: bool):
    """float32 values over many decades, zeros and both signs (if signed)."""
    values = st.one_of(
        st.just(0.0),
        st.floats(float(np.float32(1e-30)), float(np.float32(1e30)), width=32),
        st.floats(0, 1e4, width=32, allow_subnormal=True),
    )
    if signed:
        return st.builds(lambda v, s: s * v, values, st.sampled_from([-1.0, 1.0]))
    return values


# Rows of 20 in blocks of 8: two full blocks and a tail of 4.
ROWS, COLUMNS, SMALL_BLOCK = 3, 20, 8


def blocks_of(signed: bool):
    """(x, block): a (3, 20) float32 array, blocks of 8."""
    return st.lists(
        magnitudes(signed), min_size=ROWS * COLUMNS, max_size=ROWS * COLUMNS
    ).map(lambda v: (np.array(v, np.float32).reshape(ROWS, COLUMNS), SMALL_BLOCK))


def brute_force(x, scales, code_map, block):
    """Per element of x (float64): its block's scale and every code's value
    times it, computed as float32, subnormals 0 (what dequantize returns)."""
    scale = np.repeat(np.asarray(scales, np.float32), block, axis=-1)
    scale = scale[..., : x.shape[-1]]
    table = np.asarray(spec.code_values(code_map), np.float32)
    candidates = as_the_spec_reads(table[None, :] * scale.reshape(-1, 1))
    return scale, candidates.astype(np.float64)


@pytest.mark.parametrize("name", MAPS)
@given(data=st.data())
def test_quantize_nearest_reads_back_the_nearest_value(name, data):
    code_map = MAPS[name]
    x, block = data.draw(blocks_of(code_map.signed))
    codes, scales = quantize(x, code_map, "nearest", block=block)
    assert codes.dtype == code_map.dtype and codes.shape == x.shape
    assert scales.dtype == jnp.float32
    assert scales.shape == spec.scale_shape(x.shape, block)
    got = np.asarray(dequantize(codes, scales, code_map, block), np.float64)
    _, candidates = brute_force(x, scales, code_map, block)
    exact = as_the_spec_reads(x).astype(np.float64).reshape(-1, 1)
    best = np.abs(candidates - exact).min(axis=1)
    np.testing.assert_array_equal(np.abs(got.reshape(-1) - exact[:, 0]), best)


@pytest.mark.parametrize("name", MAPS)
@given(data=st.data())
def test_quantize_up_reads_back_the_smallest_value_at_or_above(name, data):
    code_map = MAPS[name]
    x, block = data.draw(blocks_of(code_map.signed))
    codes, scales = quantize(x, code_map, "up", block=block)
    got = np.asarray(dequantize(codes, scales, code_map, block), np.float64)
    _, candidates = brute_force(x, scales, code_map, block)
    exact = as_the_spec_reads(x).astype(np.float64).reshape(-1, 1)
    smallest = np.where(candidates >= exact, candidates, np.inf).min(axis=1)
    np.testing.assert_array_equal(got.reshape(-1), smallest)
    assert (got >= as_the_spec_reads(x)).all()


@pytest.mark.parametrize("name", MAPS)
@given(data=st.data())
def test_round_trip_error_is_within_half_a_spacing(name, data):
    """|read - x| <= 2^-(m+1) |x| in the map's normal range, and half the
    smallest spacing, 2^(min_exponent - m - 1) * scale, below it."""
    code_map = MAPS[name]
    x, block = data.draw(blocks_of(code_map.signed))
    codes, scales = quantize(x, code_map, "nearest", block=block)
    got = np.asarray(dequantize(codes, scales, code_map, block), np.float64)
    scale, _ = brute_force(x, scales, code_map, block)
    m = code_map.mantissa_bits
    bound = np.maximum(
        np.abs(as_the_spec_reads(x).astype(np.float64)) * 2.0 ** -(m + 1),
        scale * 2.0 ** (code_map.min_exponent - m - 1),
    )
    assert (np.abs(got - x) <= bound).all()


# --- Scales and the block layout. -----------------------------------------------


# (map, block max |x|, scale) worked by hand: the smallest power of two s
# with max <= top * s (top = 1.9375 for both maps; 1.984375 for E0M7).
HAND_SCALES = [
    ("nu", 1.0, 1.0),
    ("nu", 1.9375, 1.0),
    ("nu", 1.94, 2.0),
    ("nu", 3.0, 2.0),
    ("nu", 3.875, 2.0),
    ("nu", 3.9, 4.0),
    ("nu", 1.9375 + 2.0**-23, 2.0),  # One float32 ulp above top * 1.
    ("E0M7", 3.9, 2.0),  # <= 1.984375 * 2 = 3.96875.
    ("E0M7", 3.97, 4.0),
    ("mu", -3.9, 4.0),
    ("mu", 1e-3, 2.0**-10),  # 1e-3 = 1.024 * 2^-10.
    ("nu", 0.0, 0.0),
    ("nu", 1e-40, 0.0),  # A float32 subnormal counts as 0.
    ("nu", 2.0**-126, 2.0**-126),
    ("nu", 3e38, 2.0**127),
    ("nu", 3.4e38, np.inf),  # Above 1.9375 * 2^127.
    ("nu", np.inf, np.inf),
    ("nu", np.nan, np.inf),
]


@pytest.mark.parametrize("name, absmax, scale", HAND_SCALES, ids=str)
def test_block_scales_hand_worked(name, absmax, scale):
    x = np.zeros(5, np.float32)
    x[2] = absmax
    got = spec.block_scales(x, ALL_MAPS[name])
    assert got.shape == (1,) and got.dtype == jnp.float32
    assert float(got[0]) == scale


@pytest.mark.parametrize("name", MAPS)
@given(absmax=st.floats(2.0**-126, float(np.float32(1e38)), width=32))
def test_the_scale_is_the_smallest_power_of_two_that_fits(name, absmax):
    code_map = MAPS[name]
    scale = float(spec.block_scales(np.float32([absmax]), code_map)[0])
    assert scale == 2.0 ** round(math.log2(scale))
    assert absmax <= code_map.top * scale
    assert scale == 2.0**-126 or absmax > code_map.top * scale / 2


def test_a_hand_worked_block():
    """mu map, absmax 3 -> scale 2: 0.5 -> q 0.25 = 2^-2, code (5 << 4);
    -3 -> q -1.5 = -2^0 (1 + 8/16), code -(7 << 4 | 8); 1e-4 -> q 5e-5 =
    0.0512 of the smallest spacing 2^-10: code 0 (to nearest) or 1 (up,
    reading 2^-10 * 2)."""
    x = np.float32([0, 0.5, -3.0, 1e-4])
    codes, scales = quantize(x, spec.MU_MAP, "nearest")
    assert codes.tolist() == [0, 80, -120, 0] and scales.tolist() == [2.0]
    codes, _ = quantize(x, spec.MU_MAP, "up")
    assert codes.tolist() == [0, 80, -120, 1]
    read = dequantize(codes, scales, spec.MU_MAP)
    assert read.tolist() == [0.0, 0.5, -3.0, 2.0**-9]


def test_below_the_smallest_spacing_stochastic_goes_away_only_at_r_0():
    """n = |x| / (the smallest spacing x the scale) below 2^-24 rounds away
    at r = 0 (the probability rounded up to a multiple of 2^-24), down to
    n = 2^-126; below that, and to nearest, it is 0; up, it is the smallest
    code (or 0 from below). Rows of scale 2^0, 2^20 and 2^100 (nu map:
    smallest spacing 2^-18 x scale)."""
    x = np.float32(
        [
            [1.0, 2.0**-120, 0.0],
            [2.0**20, 2.0**-124, 2.0**-125],
            [2.0**100, 2.0**-60, 0.0],
        ]
    )
    zeros = np.zeros(x.shape, np.uint32)
    codes, scales = spec.quantize(x, spec.NU_MAP, "stochastic", zeros, block=128)
    assert scales[:, 0].tolist() == [1.0, 2.0**20, 2.0**100]
    assert codes.tolist() == [[240, 1, 0], [240, 1, 0], [240, 0, 0]]
    codes, _ = spec.quantize(x, spec.NU_MAP, "stochastic", zeros - 1, block=128)
    assert codes.tolist() == [[240, 0, 0], [240, 0, 0], [240, 0, 0]]
    codes, _ = spec.quantize(x, spec.NU_MAP, "nearest", block=128)
    assert codes.tolist() == [[240, 0, 0], [240, 0, 0], [240, 0, 0]]
    # Up: any positive value to at least the smallest code, a negative one
    # toward zero.
    codes, _ = spec.quantize(x, spec.NU_MAP, "up", block=128)
    assert codes.tolist() == [[240, 1, 0], [240, 1, 1], [240, 1, 0]]
    codes, _ = spec.quantize(-x, spec.MU_MAP, "up", block=128)
    assert codes.tolist() == [[-112, 0, 0], [-112, 0, 0], [-112, 0, 0]]


def test_block_absmax_of_zeros_and_subnormals_is_zero():
    """Zeros and float32 subnormals count as 0: such a block's absmax is +0
    (and its scale 0), bit for bit."""
    x = np.float32([[0.0, -0.0, 1e-40, -1e-45], [0.0, 0.0, 0.0, 0.0]])
    absmax = spec.block_absmax(x, block=4)
    np.testing.assert_array_equal(np.asarray(absmax).view(np.uint32), [[0], [0]])
    assert spec.block_scales(x, spec.NU_MAP, block=4).tolist() == [[0.0], [0.0]]


SHAPES = [
    ((256,), 256, (1,)),
    ((257,), 256, (2,)),
    ((600,), 256, (3,)),
    ((2, 3, 600), 256, (2, 3, 3)),
    ((5, 16), 256, (5, 1)),
    ((4, 0), 256, (4, 0)),
    ((7,), 1, (7,)),
]


@pytest.mark.parametrize("shape, block, expected", SHAPES, ids=str)
def test_scale_shapes(shape, block, expected):
    assert spec.scale_shape(shape, block) == expected
    x = jnp.ones(shape)
    codes, scales = quantize(x, spec.NU_MAP, block=block)
    assert codes.shape == shape and scales.shape == expected
    assert dequantize(codes, scales, spec.NU_MAP, block).shape == shape


def test_scale_shape_refuses_a_scalar_and_an_empty_block():
    with pytest.raises(ValueError, match="at least one dimension"):
        spec.scale_shape(())
    with pytest.raises(ValueError, match="block=0"):
        spec.scale_shape((4,), 0)


def test_blocks_are_consecutive_elements_of_a_row_with_a_shorter_tail():
    """Each block is quantized on its own: (2, 600) with blocks of 256 equals
    its pieces [0, 256), [256, 512), [512, 600) quantized apart, row by row."""
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(2, 600)) * np.exp(rng.normal(0, 3, (1, 600)))).astype(
        np.float32
    )
    codes, scales = quantize(x, spec.MU_MAP)
    for row in range(2):
        for index, (start, stop) in enumerate([(0, 256), (256, 512), (512, 600)]):
            piece_codes, piece_scale = quantize(x[row, start:stop], spec.MU_MAP)
            np.testing.assert_array_equal(codes[row, start:stop], piece_codes)
            assert scales[row, index] == piece_scale[0]


def test_the_small_leaf_rule():
    assert spec.quantizes((4096,)) and spec.quantizes((64, 64))
    assert spec.quantizes((2, 2048)) and spec.quantizes((8, 16, 32))
    assert not spec.quantizes((4095,)) and not spec.quantizes(())
    assert not spec.quantizes((4096, 1))  # 1-element blocks: 5 bytes, not 4.
    assert spec.quantizes((2048, 2))
    assert spec.quantizes((100,), min_size=64)


# --- Zeros, non-finite values and nu_max. ---------------------------------------


@pytest.mark.parametrize("name", MAPS)
@pytest.mark.parametrize("rounding", spec.ROUNDINGS)
def test_zero_stays_zero_and_positive_up_stays_positive(name, rounding):
    code_map = MAPS[name]
    x = np.zeros((3, 300), np.float32)
    x[0, 5] = 1e6  # A block whose other values are zeros...
    x[0, 290] = 1e-30  # ...one where a tiny value is alone...
    x[1, :] = np.geomspace(1e-20, 1e3, 300)  # ...and 23 decades in a row.
    for bits in (0, 2**32 - 1):
        codes, scales = quantize(
            x, code_map, rounding, jnp.full(x.shape, bits, jnp.uint32)
        )
        read = np.asarray(dequantize(codes, scales, code_map))
        assert (read[x == 0] == 0).all()
        assert (np.asarray(codes)[x == 0] == 0).all()
        assert scales[2, 0] == 0 and scales[2, 1] == 0  # All-zero blocks.
    codes, scales = quantize(x, code_map, "up")
    assert (np.asarray(dequantize(codes, scales, code_map))[x > 0] > 0).all()


def test_a_non_finite_block_reads_back_as_nan():
    x = np.ones((2, 300), np.float32)
    x[0, 3], x[1, 280] = np.nan, np.inf
    codes, scales = quantize(x, spec.NU_MAP, "up")
    assert np.isinf(scales[0, 0]) and np.isinf(scales[1, 1])
    read = np.asarray(dequantize(codes, scales, spec.NU_MAP))
    assert np.isnan(read[0, :256]).all() and np.isnan(read[1, 256:]).all()
    assert (read[0, 256:] == 1).all() and (read[1, :256] == 1).all()


def test_nu_max_never_decreases_and_never_falls_below_the_exact_maximum():
    """80 steps of nu_max_t = up(max(read(nu_max_{t-1}), nu_hat_t)) with nu_hat
    spread over decades, moving up and down by steps and per block: the
    value read back is >= the exact maximum and >= the previous one."""
    rng = np.random.default_rng(1)
    shape, stored = (3, 600), None
    previous = np.zeros((3, 600), np.float32)
    for _ in range(80):
        nu_hat = rng.lognormal(0, 4, shape) * rng.lognormal(0, 2, (1, 1))
        nu_hat = nu_hat.astype(np.float32)
        exact = spec.running_max(previous, nu_hat)
        stored = quantize(exact, spec.NU_MAP, "up")
        read = np.asarray(dequantize(*stored, spec.NU_MAP))
        assert (read >= exact).all() and (read >= previous).all()
        previous = read


# --- Stochastic rounding. --------------------------------------------------------


def neighbours(q: float, code_map) -> tuple[int, int]:
    """(toward zero, away from zero): the codes around q, by brute force over
    every code's value; equal when q is a code's value."""
    values, codes = published_values(code_map), all_codes(code_map)
    lower, upper = codes[values <= q].max(), codes[values >= q].min()
    return (upper, lower) if q < 0 else (lower, upper)


@pytest.mark.parametrize("name", MAPS)
@given(data=st.data())
def test_stochastic_lands_on_a_neighbouring_code(name, data):
    code_map = MAPS[name]
    q = normalized(code_map, data)
    bits = data.draw(st.lists(UINT32, min_size=q.size, max_size=q.size))
    got = encode(q, code_map, "stochastic", np.array(bits, np.uint32))
    assert got.dtype == code_map.dtype
    q = as_the_spec_reads(q).astype(np.float64)
    for x, code in zip(q, np.asarray(got, np.int64), strict=True):
        assert code in neighbours(x, code_map), (x, code)


# (map, normalized q, k: the map's spacing at q over q's float32 spacing, as a
# power of two): ordinary, negative, subnormal in the map, just below the top.
EXACT_CASES = [
    ("nu", 1.0 + 2**-6 + 2**-19, 19),
    ("nu", 0.3, 19),
    ("nu", 2.0**-15 * 1.3, 20),  # Subnormal in the map: a binade below 2^-14.
    ("nu", 1.9375 - 2**-15, 19),  # Rounds to the top or below it.
    ("mu", -0.7, 19),
    ("mu", 0.01, 20),  # Subnormal in the map (below 2^-6).
]


@pytest.mark.parametrize("name, q, fraction_bits", EXACT_CASES, ids=str)
def test_probability_of_rounding_away_is_exactly_the_fraction(name, q, fraction_bits):
    """Over all 2^k values of the top k random bits, q rounds away from zero
    for exactly f of them, f being the k bits of |q| below the map's spacing:
    P = f / 2^k."""
    code_map = MAPS[name]
    q32 = float(np.float32(q))
    toward, away = neighbours(q32, code_map)
    values = published_values(code_map)
    low = all_codes(code_map)[0]
    near, far = abs(values[toward - low]), abs(values[away - low])
    fraction = (abs(q32) - near) / (far - near) * 2**fraction_bits
    assert fraction == int(fraction) and 0 < fraction < 2**fraction_bits
    top = np.arange(2**fraction_bits, dtype=np.uint64) << np.uint64(32 - fraction_bits)
    got = np.asarray(
        encode(
            np.full(top.shape, q32, np.float32),
            code_map,
            "stochastic",
            top.astype(np.uint32),
        ),
        np.int64,
    )
    assert set(np.unique(got)) == {toward, away}
    assert int((got == away).sum()) == int(fraction)


# Values to average with bits from the counter-based stream.
UNBIASED_CASES = [
    ("nu", 0.7),
    ("nu", 3e-6),  # The map's subnormal range (below 2^-14).
    ("nu", 1e-7),  # Below its smallest value, 2^-18.
    ("mu", -1.3),
    ("mu", 0.05),
]


@pytest.mark.parametrize("name, q", UNBIASED_CASES, ids=str)
def test_unbiased_within_the_sample_bound(name, q):
    """The mean of n = 2^16 rounded copies (one stream, consecutive indices)
    is within 6 standard deviations of q: |mean - q| <= 6 * gap *
    sqrt(p (1 - p) / n), plus 2^-24 of the gap (the probability is a
    multiple of 2^-24). A false alarm has probability about 2e-9."""
    code_map, n = MAPS[name], 2**16
    q32 = np.float32(q)
    bits = spec.random_bits(spec.stream_key(0, 1, 3, spec.NU), (n,))
    codes = encode(np.full(n, q32), code_map, "stochastic", bits)
    got = np.asarray(spec.decode(codes, code_map), np.float64)
    values = np.unique(got)
    assert len(values) == 2
    gap = values[1] - values[0]
    p = (float(q32) - values[0]) / gap
    bound = 6 * gap * math.sqrt(p * (1 - p) / n) + gap * 2.0**-24
    assert abs(got.mean() - float(q32)) <= bound, (got.mean(), q32, bound)


def test_nu_max_up_is_not_stochastic_and_the_others_are_reproducible():
    """Rounding up ignores bits; stochastic rounding is a function of them."""
    x = jnp.asarray(np.random.default_rng(2).lognormal(0, 3, (4, 300)), jnp.float32)
    bits = [
        spec.random_bits(spec.stream_key(s, 1, 0, spec.NU), x.shape) for s in (0, 1)
    ]
    ups = [quantize(x, spec.NU_MAP, "up", b) for b in bits]
    np.testing.assert_array_equal(ups[0][0], ups[1][0])
    first = quantize(x, spec.NU_MAP, "stochastic", bits[0])
    again = quantize(x, spec.NU_MAP, "stochastic", bits[0])
    other = quantize(x, spec.NU_MAP, "stochastic", bits[1])
    np.testing.assert_array_equal(first[0], again[0])
    assert (np.asarray(first[0]) != np.asarray(other[0])).any()


@pytest.mark.parametrize("name", MAPS)
def test_jit_eager_and_x64_agree(name):
    """The same bits jitted, eagerly, under x64 from float64 input (taken as
    float32, computed in float32 and int32 all the same), and from the
    random bits as int64 (taken as uint32)."""
    code_map = MAPS[name]
    rng = np.random.default_rng(3)
    x = (rng.normal(size=(3, 700)) * np.exp(rng.normal(0, 4, (3, 700)))).astype(
        np.float32
    )
    if not code_map.signed:
        x = np.abs(x)
    bits = spec.random_bits(spec.stream_key(5, 9, 1, spec.MU), x.shape)
    for rounding in spec.ROUNDINGS:

        def round_trip(x, bits, rounding=rounding):
            codes, scales = spec.quantize(x, code_map, rounding, bits)
            return codes, scales, spec.dequantize(codes, scales, code_map)

        eager = round_trip(x, bits)
        jitted = jax.jit(round_trip)(x, bits)
        with jax.enable_x64(True):
            wide = round_trip(x.astype(np.float64), bits)
        signed = round_trip(x, np.asarray(bits).astype(np.int64))
        for a, *others in zip(eager, jitted, wide, signed, strict=True):
            for b in others:
                assert a.dtype == b.dtype
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    q = x / np.abs(x).max() * code_map.top
    codes = encode(q, code_map)
    with jax.enable_x64(True):
        np.testing.assert_array_equal(encode(q.astype(np.float64), code_map), codes)


def test_values_below_the_smallest_normal_read_as_zero():
    """value(code) x scale below 2^-126 reads as 0; 2^-126 itself does not."""
    codes = jnp.asarray([[1, 16, 255]], jnp.uint8)
    scales = jnp.asarray([[2.0**-112]], jnp.float32)
    got = spec.dequantize(codes, scales, spec.NU_MAP, block=128)
    expected = np.float32([[0.0, 2.0**-126, 1.9375 * 2.0**-112]])
    np.testing.assert_array_equal(np.asarray(got), expected)
