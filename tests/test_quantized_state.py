"""8-bit block-quantized state (`mu_dtype=int8`, `nu_dtype=uint8`) on every
implementation, against the spec.

The step's arithmetic is the float step's: from the same values read back,
the quantized step and a float32-state step compute the same float32
moments, update and params, bitwise. So each quantized step is judged in two
parts: its params and updates equal the float32-state step's from the
dequantized state, and its codes and scales equal the spec's `quantize` of
that step's moments (`mu`, `nu` rounded to nearest or stochastically by the
spec's bits, `nu_max` up), bitwise. The float32 step itself is judged
against the spec elsewhere (tests/test_implementations.py). The spec's own
quantized step is compared in `test_spec_step_agrees`.
"""

from __future__ import annotations

import pickle

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tolerances
from hypothesis import given, note
from hypothesis import strategies as st
from implementations import named

import amsgrad_spec as spec
import pallas_amsgrad
from pallas_amsgrad import _math, _quantization

# Leaves of at least 4096 elements (quantized): blocks that fill rows, rows
# with tails, a vector, three dims, rows of exactly one 128-block.
QUANTIZED_SHAPES = [(16, 300), (4096,), (2, 3, 700), (40, 128), (5, 1000)]
# Leaves that stay float32: too small, or a last dim of 1.
SMALL_SHAPES = [(), (7,), (3, 5), (4095,), (4096, 1)]
STEPS = 3


@st.composite
def cases(draw):
    """(params, [grads per step], hp): 1-2 quantized leaves and maybe a small
    one; rows whose magnitudes span decades, a zero row, a zero step."""
    shapes = draw(st.lists(st.sampled_from(QUANTIZED_SHAPES), min_size=1, max_size=2))
    shapes += draw(st.lists(st.sampled_from(SMALL_SHAPES), max_size=1))
    dtype = draw(st.sampled_from([jnp.float32, jnp.bfloat16]))
    mu_dtype, nu_dtype = draw(
        st.sampled_from(
            [
                (jnp.int8, jnp.uint8),
                (jnp.int8, None),
                (None, jnp.uint8),
                (jnp.bfloat16, jnp.uint8),
                (jnp.int8, jnp.bfloat16),
            ]
        )
    )
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    zero_step = draw(st.integers(0, STEPS - 1))

    def sample(shape, on=True):
        rows = np.exp(rng.uniform(-8, 3, (*shape[:-1], 1))) if shape else 1.0
        values = rng.normal(size=shape) * rows * on
        if len(shape) >= 2:
            values[..., 0, :] = 0  # A row whose moments stay exactly zero.
        return jnp.asarray(values, dtype)

    params = {f"p{k}": sample(shape) for k, shape in enumerate(shapes)}
    grads = [
        {f"p{k}": sample(shape, step != zero_step) for k, shape in enumerate(shapes)}
        for step in range(STEPS)
    ]
    recipe = draw(st.booleans())
    hp = spec.Hyperparams(
        learning_rate=draw(st.sampled_from([1e-3, 0.1])),
        b2=draw(st.sampled_from([0.999, 0.9])),
        mu_dtype=mu_dtype,
        nu_dtype=nu_dtype,
        stochastic_rounding=draw(st.booleans()),
        seed=draw(st.integers(0, 2**32 - 1)),
        quantization_block=draw(st.sampled_from([128, 256])),
        weight_decay=0.01 if recipe else None,
        max_grad_norm=1.0 if recipe else None,
    )
    return params, grads, hp


def optimizer(hp, implementation, **overrides):
    options = dict(
        mu_dtype=hp.mu_dtype,
        nu_dtype=hp.nu_dtype,
        stochastic_rounding=hp.stochastic_rounding,
        seed=hp.seed,
        quantization_block=hp.quantization_block,
        weight_decay=hp.weight_decay,
        max_grad_norm=hp.max_grad_norm,
        max_consecutive_errors=hp.max_consecutive_errors,
    )
    return pallas_amsgrad.amsgrad(
        hp.learning_rate,
        b2=hp.b2,
        implementation=implementation,
        **(options | overrides),
    )


def float_storage(dtype):
    """The float dtype that holds an 8-bit moment's values exactly."""
    if dtype is not None and jnp.dtype(dtype) in _quantization.QUANTIZED_DTYPES:
        return jnp.float32
    return dtype


def amsgrad_state(state):
    """The ScaleByAmsgradState inside an `amsgrad` state."""
    parts = state.inner_state if isinstance(state, optax.ApplyIfFiniteState) else state
    return next(p for p in parts if isinstance(p, optax.ScaleByAmsgradState))


def is_quantized(x) -> bool:
    return isinstance(x, pallas_amsgrad.QuantizedArray)


def read_back(state):
    """`state` with every quantized moment dequantized to float32."""
    return jax.tree.map(
        lambda x: pallas_amsgrad.dequantize(x) if is_quantized(x) else x,
        state,
        is_leaf=is_quantized,
    )


def expected_moment(value, stored, hp, count, path, array):
    """The spec's store of a float32 moment where `stored` is quantized."""
    if not isinstance(stored, pallas_amsgrad.QuantizedArray):
        return None
    code_map = spec.MU_MAP if array == spec.MU else spec.NU_MAP
    rounding, bits = "nearest", None
    if array == spec.NU_MAX:
        rounding = "up"
    elif hp.stochastic_rounding:
        key = spec.stream_key(hp.seed, count, spec.leaf_id(path), array)
        rounding, bits = "stochastic", spec.random_bits(key, value.shape)
    return spec.quantize(value, code_map, rounding, bits, hp.quantization_block)


def check_quantized_step(implementation, params, grads, hp):
    opt = optimizer(hp, implementation)
    exact = optimizer(
        hp,
        implementation,
        mu_dtype=float_storage(hp.mu_dtype),
        nu_dtype=float_storage(hp.nu_dtype),
        quantization_block=None,
    )
    step, exact_step = jax.jit(opt.step), jax.jit(exact.step)
    update, exact_update = jax.jit(opt.update), jax.jit(exact.update)
    state = opt.init(params)
    for i, g in enumerate(grads):
        context = f"step {i}: "
        new_params, new_state = step(g, state, params)
        updates, update_state = update(g, state, params)
        tolerances.assert_trees_equal(update_state, new_state, context)
        read = read_back(state)
        exact_params, exact_state = exact_step(g, read, params)
        exact_updates, _ = exact_update(g, read, params)
        tolerances.assert_trees_equal(new_params, exact_params, context + "params: ")
        tolerances.assert_trees_equal(updates, exact_updates, context + "updates: ")

        quantized, moments = amsgrad_state(new_state), amsgrad_state(exact_state)
        previous = amsgrad_state(read)
        count = quantized.count
        for name, array in (("mu", spec.MU), ("nu", spec.NU), ("nu_max", spec.NU_MAX)):
            for (path, stored), value, before in zip(
                jax.tree_util.tree_flatten_with_path(
                    getattr(quantized, name), is_leaf=is_quantized
                )[0],
                jax.tree.leaves(getattr(moments, name)),
                jax.tree.leaves(getattr(previous, name)),
                strict=True,
            ):
                path = jax.tree_util.keystr(path)
                expected = expected_moment(value, stored, hp, count, path, array)
                where = f"{context}state.{name}{path}"
                if expected is None:
                    tolerances.assert_trees_equal(stored, value, where)
                    continue
                np.testing.assert_array_equal(stored.codes, expected[0], where)
                np.testing.assert_array_equal(
                    stored.scales.view(jnp.int32), expected[1].view(jnp.int32), where
                )
                read_value = pallas_amsgrad.dequantize(stored)
                # Zeros stay exactly zero, whatever the rounding.
                assert bool(jnp.all(jnp.where(value == 0, read_value == 0, True))), (
                    where
                )
                if array == spec.NU_MAX:
                    # Never below the exact running maximum, never decreasing,
                    # never 0 where it is not.
                    assert bool(jnp.all(read_value >= value)), where
                    assert bool(jnp.all(read_value >= before)), where
                    assert bool(jnp.all((value == 0) == (read_value == 0))), where
        state, params = new_state, new_params


@given(case=cases())
def test_step_equals_the_float_step_stored_by_the_spec(implementation, case):
    params, grads, hp = case
    note(f"{hp=}")
    check_quantized_step(implementation, params, grads, hp)


def test_each_moment_rounds_as_its_own_dtype_asks(implementation):
    """Stochastic rounding with one moment 8-bit and the other float32 (not
    rounded) or bfloat16: the 8-bit one rounds stochastically all the same."""
    rng = np.random.default_rng(6)
    params = {"w": jnp.asarray(rng.normal(size=(16, 300)), jnp.float32)}
    grads = [
        jax.tree.map(lambda p, k=k: jnp.cos(p * (2 + k)), params) for k in range(2)
    ]
    for mu_dtype, nu_dtype in [
        (jnp.int8, None),
        (None, jnp.uint8),
        (jnp.int8, jnp.bfloat16),
    ]:
        hp = spec.Hyperparams(
            0.01, mu_dtype=mu_dtype, nu_dtype=nu_dtype, stochastic_rounding=True, seed=3
        )
        check_quantized_step(implementation, params, grads, hp)


def test_skipped_step_keeps_codes_and_scales(implementation):
    """The finite guard's skip leaves every code and scale as it was (the XLA
    path's branch and the kernels' select alike), and the count."""
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(16, 300)), jnp.float32)}
    hp = spec.Hyperparams(
        0.01, mu_dtype=jnp.int8, nu_dtype=jnp.uint8, max_consecutive_errors=3
    )
    opt = optimizer(hp, implementation)
    g = {"w": jnp.asarray(rng.normal(size=(16, 300)), jnp.float32)}
    params, state = jax.jit(opt.step)(g, opt.init(params), params)
    bad = {"w": g["w"].at[3, 7].set(jnp.nan)}
    new_params, new_state = jax.jit(opt.step)(bad, state, params)
    tolerances.assert_trees_equal(new_params, params)
    tolerances.assert_trees_equal(new_state.inner_state, state.inner_state)
    assert int(new_state.notfinite_count) == 1


@pytest.mark.parametrize(
    "block, stochastic", [(256, True), (128, False)], ids=["256-stochastic", "128"]
)
def test_spec_step_agrees(block, stochastic):
    """The spec's quantized step (dequantize, its float step, quantize) and
    the implementation's, at the default quantization block with stochastic
    rounding and at another block to nearest: the same codes except where a
    last-bit difference of the float step crosses a rounding threshold, never
    more than one code apart where the scales agree."""
    rng = np.random.default_rng(1)
    params = {
        "w": jnp.asarray(rng.normal(size=(16, 300)), jnp.float32),
        "v": jnp.asarray(rng.normal(size=(4096,)) * 1e-3, jnp.float32),
        "b": jnp.asarray(rng.normal(size=(7,)), jnp.float32),
    }
    hp = spec.Hyperparams(
        0.01,
        mu_dtype=jnp.int8,
        nu_dtype=jnp.uint8,
        stochastic_rounding=stochastic,
        seed=5,
        quantization_block=block,
    )
    opt = optimizer(hp, "xla")
    state = opt.init(params)
    spec_state = spec.init(params, jnp.int8, jnp.uint8, block)
    for step in range(STEPS):
        g = jax.tree.map(lambda p, s=step: jnp.sin((s + 2) * p * 100) * 0.1, params)
        _, spec_state = spec.step(g, spec_state, params, hp)
        params, state = jax.jit(opt.step)(g, state, params)
        for name in ("mu", "nu", "nu_max"):
            for ours, theirs in zip(
                jax.tree.leaves(getattr(state[0], name), is_leaf=is_quantized),
                jax.tree.leaves(
                    getattr(spec_state, name),
                    is_leaf=lambda x: isinstance(x, spec.QuantizedMoment),
                ),
                strict=True,
            ):
                if not isinstance(theirs, spec.QuantizedMoment):
                    assert not isinstance(ours, pallas_amsgrad.QuantizedArray)
                    continue
                codes = np.asarray(ours.codes, np.int32)
                same_scale = np.repeat(
                    np.asarray(ours.scales == theirs.scales), block, axis=-1
                )[..., : codes.shape[-1]]
                difference = np.abs(codes - np.asarray(theirs.codes, np.int32))
                assert same_scale.mean() > 0.9, name
                assert np.all(difference[same_scale] <= 1), name
                assert np.mean(difference == 0) > 0.99, name
        # Continue both from the implementation's state.
        spec_state = spec_state._replace(
            **{
                name: jax.tree.map(
                    lambda x: (
                        spec.QuantizedMoment(x.codes, x.scales)
                        if is_quantized(x)
                        else x
                    ),
                    getattr(state[0], name),
                    is_leaf=is_quantized,
                )
                for name in ("mu", "nu", "nu_max")
            }
        )


@pytest.mark.parametrize("block", [128, 256, 384])
def test_quantizer_equals_spec(block):
    """The package's quantizer, which the XLA path and the kernels run, is
    the spec's bit for bit: every map, rounding and block size, with
    float32 subnormals, zeros, NaN, inf and values past the largest scale."""
    rng = np.random.default_rng(block)
    x = rng.normal(size=(6, 700)) * np.exp(rng.uniform(-40, 40, (6, 1)))
    x[0, :5] = [0.0, -0.0, 1e-45, -1e-40, 3e38]
    x[1, 3] = np.nan
    x[2, 400] = np.inf
    x[3] = 0.0
    assert_quantizer_equals_spec(jnp.asarray(x, jnp.float32), block, rng)


def test_quantizer_equals_spec_at_the_edges():
    """Blocks at the edges of the scale's choice and of the codes, bitwise as
    the spec's: max |x| in float32's smallest normal binade beside
    subnormals (a block of subnormals only is all zero); max |x| at the top
    value times a power of two, and one ulp either side (above it the scale
    doubles); elements 2^-126 to 2^-164 times the scale, and one whose
    scaled value is float32's smallest normal with random bits 0 (rounded
    up stochastically: probability 2^-24 in the spec); fractions of exactly
    one half against random bits of one half."""
    rng = np.random.default_rng(5)
    smallest = np.float32(2.0**-126)
    x = rng.uniform(-1, 1, (12, 128)).astype(np.float32)
    x[0] = smallest * rng.uniform(1, 2, 128)
    x[1] = smallest * np.float32(2.0**-3) * x[1]  # Subnormal.
    x[2, ::2] = x[1, ::2]  # Half subnormal, half in the smallest binade.
    x[3, 1:] = smallest * np.float32(0.5) * x[3, 1:]  # Subnormal,
    x[3, 0] = smallest  # but for the first.
    top = np.float32(1.9375 * 2.0**20)  # Both maps' top value, 1 + 15/16.
    edges = np.nextafter(top, np.array([0, top, np.inf], np.float32))
    for row, max_abs in zip((4, 5, 6), edges, strict=True):
        x[row, 7] = -max_abs
    x[7] = np.float32(2.0**-100) * x[7]  # A tiny scale.
    x[8] = np.float32(2.0**100) * x[8]
    x[8, 1:40] = np.float32(2.0**100) * np.exp2(-np.arange(126.0, 165.0))
    x[8, 40:79] = -x[8, 1:40]
    # The scaled value's field is 1 for int8's scale 2^10 and uint8's 2^18.
    x[9, 0], x[9, 1:] = 1500.0, np.float32(1.5) * smallest
    x[10, 0], x[10, 1:] = 400000.0, np.float32(1.5) * smallest
    # Halfway between codes (1 and 1 + 1/16 at scale 1), bits 2^31: a
    # fraction of exactly r / 2^24 rounds toward zero.
    x[11, 0], x[11, 1:64], x[11, 64:] = 1.5, 1 + 1 / 32, -1 - 1 / 32
    bits = rng.integers(0, 2**32, x.shape, dtype=np.uint32)
    bits[8:11] = 0
    bits[11] = 2**31
    assert_quantizer_equals_spec(jnp.asarray(x), 128, bits=jnp.asarray(bits))


def test_every_code_reads_as_the_spec_at_every_scale():
    """Each of the 256 codes of both maps, at scales from 0 (an all-zero
    block) through 2^-126 (values below it read as 0) to 2^127 and inf
    (NaN), read back as the spec reads it, bitwise."""
    fields = np.array([0, 1, 2, 5, 10, 17, 100, 127, 200, 254, 255], np.int32)
    scales = _quantization.scales_of(jnp.asarray(fields))[:, None]
    for spec_map, code_map in (
        (spec.MU_MAP, _quantization.MU_MAP),
        (spec.NU_MAP, _quantization.NU_MAP),
    ):
        codes = np.arange(256, dtype=np.uint8).view(code_map.dtype)
        codes = jnp.asarray(np.tile(codes, (len(fields), 1)))
        ours = _quantization.QuantizedArray(codes, scales, 256)
        np.testing.assert_array_equal(
            pallas_amsgrad.dequantize(ours).view(jnp.int32),
            spec.dequantize(codes, scales, spec_map, 256).view(jnp.int32),
        )


def assert_quantizer_equals_spec(x, block, rng=None, bits=None):
    """Codes, scales and values read back of x, per map and rounding, with
    `bits` (random from `rng` if not given) for stochastic rounding."""
    if bits is None:
        bits = jnp.asarray(rng.integers(0, 2**32, x.shape, dtype=np.uint32))
    for spec_map, code_map in (
        (spec.MU_MAP, _quantization.MU_MAP),
        (spec.NU_MAP, _quantization.NU_MAP),
    ):
        values = x if spec_map.signed else jnp.abs(x)
        for rounding in spec.ROUNDINGS:
            codes, scales = spec.quantize(values, spec_map, rounding, bits, block)
            ours = _quantization.quantize(values, code_map, rounding, bits, block)
            np.testing.assert_array_equal(ours.codes, codes, rounding)
            np.testing.assert_array_equal(
                ours.scales.view(jnp.int32), scales.view(jnp.int32), rounding
            )
            np.testing.assert_array_equal(
                pallas_amsgrad.dequantize(ours).view(jnp.int32),
                spec.dequantize(codes, scales, spec_map, block).view(jnp.int32),
            )


def test_init_layout():
    """Quantized leaves get codes of their shape and a float32 scale per
    block of each row; small leaves float32 moments; the spec's init alike."""
    params = {
        "w": jnp.ones((16, 600), jnp.bfloat16),
        "v": jnp.ones((4096,)),
        "thin": jnp.ones((4096, 1)),
        "b": jnp.ones((600,), jnp.bfloat16),
    }
    opt = pallas_amsgrad.amsgrad(
        0.1, mu_dtype=jnp.int8, nu_dtype=jnp.uint8, quantization_block=128
    )
    state = opt.init(params)[0]
    assert state.mu["w"].codes.dtype == jnp.int8
    assert state.nu["w"].codes.dtype == jnp.uint8
    assert state.nu_max["w"].scales.shape == (16, 5)  # 4 x 128 + 88.
    assert state.mu["v"].scales.shape == (32,)
    assert state.mu["thin"].dtype == state.mu["b"].dtype == jnp.float32
    assert state.mu["w"].nbytes == 16 * 600 + 4 * 16 * 5
    abstract = jax.eval_shape(opt.init, params)
    assert jax.tree.structure(abstract) == jax.tree.structure(opt.init(params))
    spec_state = spec.init(params, jnp.int8, jnp.uint8, 128)
    for ours, theirs in zip(
        jax.tree.leaves(state), jax.tree.leaves(spec_state), strict=True
    ):
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype


def test_which_leaves_are_quantized():
    """At the edges: 4096 elements or more and a last dim of at least 2."""
    quantized = {(4096,): True, (2048, 2): True, (2, 2048): True, (4095,): False}
    quantized |= {(4096, 1): False, (2047, 2): False, (): False}
    params = {str(shape): jnp.zeros(shape) for shape in quantized}
    opt = pallas_amsgrad.amsgrad(0.1, mu_dtype=jnp.int8, nu_dtype=jnp.uint8)
    state = jax.eval_shape(opt.init, params)[0]
    for shape, expected in quantized.items():
        for moment in (state.mu, state.nu, state.nu_max):
            got = isinstance(moment[str(shape)], pallas_amsgrad.QuantizedArray)
            assert got == expected, shape


def test_state_round_trips_pickle_and_orbax(tmp_path):
    import orbax.checkpoint as ocp  # A dependency of flax; slow to import.

    rng = np.random.default_rng(2)
    params = {"w": jnp.asarray(rng.normal(size=(16, 300)), jnp.float32)}
    opt = pallas_amsgrad.amsgrad(0.1, mu_dtype=jnp.int8, nu_dtype=jnp.uint8)
    _, state = opt.step(params, opt.init(params), params)
    tolerances.assert_trees_equal(pickle.loads(pickle.dumps(state)), state)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "state", state)
    checkpointer.wait_until_finished()
    restored = checkpointer.restore(
        tmp_path / "state", jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    )
    tolerances.assert_trees_equal(restored, state)
    assert isinstance(restored[0].mu["w"], pallas_amsgrad.QuantizedArray)


def test_convert_state_round_trip():
    """float32 -> 8-bit -> float32 and bfloat16: mu and nu to nearest (what a
    step stores), nu_max up (never below what it replaces); a state already
    in the requested storage comes back as it is."""
    rng = np.random.default_rng(3)
    params = {
        "w": jnp.asarray(rng.normal(size=(16, 300)), jnp.float32),
        "b": jnp.zeros(5),
    }
    opt = pallas_amsgrad.amsgrad(0.1, max_grad_norm=1.0)
    state = opt.init(params)
    for _ in range(2):
        g = jax.tree.map(
            lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params
        )
        params, state = opt.step(g, state, params)
    moments = amsgrad_state(state)
    quantized = pallas_amsgrad.convert_state(
        state, params, mu_dtype=jnp.int8, nu_dtype=jnp.uint8
    )
    q = amsgrad_state(quantized)
    mu, nu_max = q.mu["w"], q.nu_max["w"]
    assert (
        isinstance(mu, pallas_amsgrad.QuantizedArray) and q.mu["b"].dtype == jnp.float32
    )
    codes, scales = spec.quantize(moments.mu["w"], spec.MU_MAP, "nearest")
    np.testing.assert_array_equal(mu.codes, codes)
    np.testing.assert_array_equal(mu.scales, scales)
    codes, scales = spec.quantize(moments.nu_max["w"], spec.NU_MAP, "up")
    np.testing.assert_array_equal(nu_max.codes, codes)
    assert quantized[0] == state[0]  # The clip's empty state.
    assert (
        pallas_amsgrad.convert_state(
            quantized, params, mu_dtype=jnp.int8, nu_dtype=jnp.uint8
        )[1].mu["w"]
        is mu
    )
    # The 8-bit optimizer steps the converted state.
    opt8 = pallas_amsgrad.amsgrad(
        0.1, max_grad_norm=1.0, mu_dtype=jnp.int8, nu_dtype=jnp.uint8
    )
    opt8.step(params, quantized, params)
    back = amsgrad_state(pallas_amsgrad.convert_state(quantized, params))
    assert back.mu["w"].dtype == jnp.float32
    np.testing.assert_array_equal(back.nu_max["w"], pallas_amsgrad.dequantize(nu_max))
    narrow = amsgrad_state(
        pallas_amsgrad.convert_state(state, params, nu_dtype=jnp.bfloat16)
    )
    assert narrow.nu_max["w"].dtype == jnp.bfloat16
    assert bool(jnp.all(narrow.nu_max["w"].astype(jnp.float32) >= moments.nu_max["w"]))
    assert bool(
        jnp.any(narrow.nu_max["w"] != moments.nu_max["w"].astype(jnp.bfloat16))
    ), "rounded up, not to nearest"


def test_convert_state_storage_cases():
    """Each conversion lands in the storage asked for: None keeps the
    param's dtype (bfloat16 too), a moment already stored so is kept as it
    is, another block size is quantized anew, either 8-bit request alone
    takes the block, and values exact in the target stay exact (nu_max up
    moves only what lies between two values)."""
    rng = np.random.default_rng(7)
    params = {
        "w": jnp.asarray(rng.normal(size=(16, 512)), jnp.float32),
        "h": jnp.asarray(rng.normal(size=(16, 512)), jnp.bfloat16),
    }
    exact = jnp.asarray(rng.integers(1, 32, size=(16, 512)), jnp.float32)
    state = pallas_amsgrad.amsgrad(0.1).init(params)
    state = (
        state[0]._replace(
            mu={"w": -exact, "h": (-exact).astype(jnp.bfloat16)},
            nu={"w": exact * 1e-7, "h": exact.astype(jnp.bfloat16)},
            nu_max={"w": exact, "h": exact.astype(jnp.bfloat16)},
        ),
        state[1],
    )
    convert = pallas_amsgrad.convert_state
    kept = convert(state, params)[0]
    assert kept.mu["w"] is state[0].mu["w"] and kept.nu["h"] is state[0].nu["h"]

    eight = convert(state, params, mu_dtype=jnp.int8, nu_dtype=jnp.uint8)[0]
    back = convert((eight,), params)[0]
    for name in ("mu", "nu", "nu_max"):
        assert getattr(back, name)["h"].dtype == jnp.bfloat16, name
        assert getattr(back, name)["w"].dtype == jnp.float32, name
    # Integers of 5 significant bits are exact in both maps (4 mantissa bits).
    np.testing.assert_array_equal(back.nu_max["w"], jnp.maximum(exact, 0))

    wide = convert((eight,), params, mu_dtype=jnp.int8, quantization_block=512)[0]
    assert wide.mu["w"].block == 512 and wide.mu["w"].scales.shape == (16, 1)
    codes, scales = spec.quantize(
        pallas_amsgrad.dequantize(eight.mu["w"]), spec.MU_MAP, "nearest", block=512
    )
    np.testing.assert_array_equal(wide.mu["w"].codes, codes)
    np.testing.assert_array_equal(wide.mu["w"].scales, scales)
    assert wide.nu["w"].dtype == jnp.float32
    wide = convert(state, params, nu_dtype=jnp.uint8, quantization_block=512)[0]
    assert wide.nu_max["w"].block == 512 and wide.mu["w"].dtype == jnp.float32

    # nu's 8-bit values lie among float16's subnormals: nu to nearest.
    narrow = convert((eight,), params, nu_dtype=jnp.float16)[0]
    nu = pallas_amsgrad.dequantize(eight.nu["w"])
    nu_max = pallas_amsgrad.dequantize(eight.nu_max["w"])
    assert bool(jnp.any(nu.astype(jnp.float16).astype(jnp.float32) != nu))
    np.testing.assert_array_equal(narrow.nu["w"], nu.astype(jnp.float16))
    assert narrow.nu["w"].dtype == narrow.nu_max["w"].dtype == jnp.float16
    assert bool(jnp.all(narrow.nu_max["w"].astype(jnp.float32) >= nu_max))
    narrow = convert(state, params, nu_dtype=jnp.bfloat16)[0]
    assert narrow.nu["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(narrow.nu["w"], (exact * 1e-7).astype(jnp.bfloat16))
    np.testing.assert_array_equal(narrow.nu_max["w"], exact.astype(jnp.bfloat16))
    with pytest.raises(TypeError, match=r"^nu_dtype=int8: 8-bit state of nu"):
        convert(state, params, nu_dtype=jnp.int8)
    wrong = (state[0]._replace(nu_max={"w": exact[:, :256], "h": exact}), state[1])
    with pytest.raises(ValueError, match=r"^state.nu_max\['w'\] has shape \(16, 256\)"):
        convert(wrong, params)


def test_8_bit_state_under_x64():
    """With 64-bit types enabled, "pallas" (which traces the TPU and GPU
    kernels beside the one this host runs) still traces, its index
    arithmetic in one integer width, and gives the XLA path's bits: the
    moments are computed in float32 all the same."""
    rng = np.random.default_rng(8)
    results = []
    with jax.enable_x64(True):
        for implementation in ("xla", "pallas"):
            opt = pallas_amsgrad.amsgrad(
                0.01,
                mu_dtype=jnp.int8,
                nu_dtype=jnp.uint8,
                implementation=implementation,
            )
            params = {"w": jnp.asarray(rng.normal(size=(16, 300)), jnp.float32)}
            state = opt.init(params)
            for step in range(2):
                grads = jax.tree.map(lambda p, s=step: jnp.cos(p * (2 + s)), params)
                params, state = jax.jit(opt.step)(grads, state, params)
            assert state[0].nu_max["w"].scales.dtype == jnp.float32
            results.append((params, state))
            rng = np.random.default_rng(8)
    tolerances.assert_trees_equal(results[1], results[0])


def test_dequantize_any_leaf():
    x = jnp.arange(6.0).reshape(2, 3)
    assert pallas_amsgrad.dequantize(x).dtype == jnp.float32
    assert pallas_amsgrad.dequantize(x.astype(jnp.bfloat16)).dtype == jnp.float32
    q = _quantization.quantize(x, _quantization.MU_MAP, "nearest", block=128)
    np.testing.assert_array_equal(pallas_amsgrad.dequantize(q), x)  # Exact here.


def test_reads_are_in_the_compute_dtype():
    """Every input a step reads (the XLA path's `read_leaf`, the kernels'
    `read_blocks`), 16-bit params and grads too, comes in the compute dtype
    with its exact value: a bfloat16 grad squared in bfloat16 would round.
    (XLA on CPU computes bfloat16 in float32 without rounding in between, so
    a step run here would not tell.)"""
    rng = np.random.default_rng(9)
    operands = _math.Operands(
        apply_to_params=True, quantized=(True, False, True), block=128
    )
    values = [jnp.asarray(rng.normal(size=(2, 256)), jnp.float32) for _ in range(5)]
    param, grad = (x.astype(jnp.bfloat16) for x in values[:2])
    nu = values[3].astype(jnp.float16)
    mu = _quantization.quantize(values[2], _quantization.MU_MAP, "nearest", block=128)
    nu_max = _quantization.quantize(
        jnp.abs(values[4]), _quantization.NU_MAP, "up", block=128
    )
    expected = [param, grad, pallas_amsgrad.dequantize(mu), nu]
    expected.append(pallas_amsgrad.dequantize(nu_max))
    leaf = [param, grad, mu.codes, mu.scales, nu, nu_max.codes, nu_max.scales]
    blocks = [
        _quantization.field_of(x)[..., None]
        if x.dtype == jnp.float32
        # Each row's two blocks of 128 along a new axis.
        else x.reshape(2, 2, 128)
        for x in leaf
    ]
    reads = {
        "read_leaf": _quantization.read_leaf(leaf, operands, jnp.float32),
        "read_blocks": [
            x.reshape(2, 256)
            for x in _quantization.read_blocks(blocks, operands, jnp.float32)
        ],
    }
    for name, read in reads.items():
        assert [x.dtype for x in read] == [jnp.float32] * 5, name
        for x, want in zip(read, expected, strict=True):
            np.testing.assert_array_equal(x, want.astype(jnp.float32), err_msg=name)


def test_eight_bit_state_bytes():
    """The state's bytes per parameter of a large leaf: 3 codes plus 3 scales
    per 256 elements, about 3.05 against float32's 12."""
    params = {"w": jax.ShapeDtypeStruct((1024, 4096), jnp.float32)}
    opt = pallas_amsgrad.amsgrad(0.1, mu_dtype=jnp.int8, nu_dtype=jnp.uint8)
    state = jax.eval_shape(opt.init, params)[0]
    moments = (state.mu, state.nu, state.nu_max)
    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(moments))
    assert total / (1024 * 4096) == pytest.approx(3 + 12 / 256)


def test_pallas_interpreter_equals_xla_path():
    """Pallas' generic interpreter and the XLA path, bitwise, with every
    option at once (the TPU kernel's check is tests/test_tpu_quantized.py)."""
    rng = np.random.default_rng(4)
    params = {
        "w": jnp.asarray(rng.normal(size=(24, 600)), jnp.bfloat16),
        "v": jnp.asarray(rng.normal(size=(3, 4, 1024)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(600,)), jnp.float32),
    }
    hp = spec.Hyperparams(
        0.01,
        mu_dtype=jnp.int8,
        nu_dtype=jnp.uint8,
        stochastic_rounding=True,
        weight_decay=0.1,
        max_grad_norm=1.0,
        max_consecutive_errors=2,
    )
    results = []
    for implementation in (named("xla"), named("pallas")):
        opt = optimizer(hp, implementation)
        p, state = params, opt.init(params)
        for s in range(2):
            g = jax.tree.map(lambda x, s=s: jnp.cos(x * (3 + s)).astype(x.dtype), p)
            p, state = jax.jit(opt.step)(g, state, p)
        results.append((p, state, jax.jit(opt.update)(g, state, p)))
    tolerances.assert_trees_equal(results[1], results[0])
