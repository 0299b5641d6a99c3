"""The fused kernel (interpreted on CPU) and the XLA path against the spec.

Full grid: param dtype x mu_dtype x implementation (the `implementation`
fixture, every object in tests/implementations.py), parametrized; hypothesis
draws the trees, values, both bias-correction flags, eps_root, constant and
scheduled learning rates and block sizes; three steps, one with zero gradient.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import strategies
import tolerances
from hypothesis import given, note
from hypothesis import strategies as st
from implementations import check_against_spec, optimizer

import amsgrad_spec as spec
import pallas_amsgrad
from pallas_amsgrad import _math
from pallas_amsgrad.tools import composition

block_sizes = st.sampled_from(
    [None, pallas_amsgrad.BlockSizes(16), pallas_amsgrad.BlockSizes(32)]
)


@strategies.a_third_of_the_examples()
@given(data=st.data())
@pytest.mark.parametrize(
    "mu_dtype", strategies.MU_DTYPES, ids=lambda d: f"mu={d and jnp.dtype(d).name}"
)
@pytest.mark.parametrize(
    "dtype", strategies.PARAM_DTYPES, ids=lambda d: jnp.dtype(d).name
)
def test_matches_spec(implementation, dtype, mu_dtype, data):
    params, grads = data.draw(strategies.trajectories(dtype))
    hp = data.draw(strategies.hyperparams(mu_dtype))
    sizes = data.draw(block_sizes)
    note(f"{hp=} {sizes=}")
    check_against_spec(implementation, params, grads, hp, sizes)


@strategies.a_third_of_the_examples()
@given(data=st.data())
@pytest.mark.parametrize(
    "nu_dtype", strategies.NU_DTYPES, ids=lambda d: f"nu={jnp.dtype(d).name}"
)
@pytest.mark.parametrize(
    "dtype", strategies.PARAM_DTYPES, ids=lambda d: jnp.dtype(d).name
)
def test_nu_dtype_matches_spec(implementation, dtype, nu_dtype, data):
    """nu and nu_max stored in `nu_dtype`, with any mu_dtype and, half the
    time, the training recipe's options (non-finite steps where it skips)."""
    trajectory = data.draw(strategies.trajectories(dtype))
    hp = data.draw(
        strategies.hyperparams(data.draw(st.sampled_from(strategies.MU_DTYPES)))
    )
    hp = dataclasses.replace(hp, nu_dtype=nu_dtype)
    if data.draw(st.booleans(), label="with the recipe"):
        hp = data.draw(strategies.recipes(hp))
    if hp.max_consecutive_errors is not None:
        trajectory = data.draw(strategies.non_finite_steps(trajectory))
    sizes = data.draw(block_sizes)
    note(f"{hp=} {sizes=}")
    check_against_spec(implementation, *trajectory, hp, sizes)


@given(data=st.data())
def test_float64_matches_spec(implementation, data):
    with jax.enable_x64(True):
        params, grads = data.draw(strategies.trajectories(jnp.float64))
        hp = data.draw(
            strategies.hyperparams(data.draw(st.sampled_from([None, jnp.float32])))
        )
        check_against_spec(implementation, params, grads, hp)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", strategies.EDGE_SHAPES, ids=str)
def test_edge_shapes(implementation, dtype, shape):
    """Scalars, size 1, ragged and empty leaves, padding never leaking; every
    output in its own dtype, empty ones too."""
    params = {"x": jnp.linspace(-2, 2, math.prod(shape), dtype=dtype).reshape(shape)}
    grads = [
        jax.tree.map(lambda p, s=s: jnp.sin(p * (3 + s)) * (s != 1), params)
        for s in range(3)
    ]
    check_against_spec(
        implementation, params, grads, spec.Hyperparams(learning_rate=0.01)
    )


def test_nan_and_inf_propagate_as_in_spec(implementation):
    grads = jnp.array([1.0, jnp.nan, jnp.inf, -jnp.inf, 0.5, 0.0, 2.0, -3.0])
    params = jnp.ones_like(grads)
    check_against_spec(
        implementation, params, [grads, grads * 0.5, grads], spec.Hyperparams(0.1)
    )


def test_scale_by_amsgrad_matches_spec(implementation):
    params = {"a": jnp.linspace(-1, 1, 300).reshape(3, 100), "b": jnp.ones(5)}
    opt = pallas_amsgrad.scale_by_amsgrad(
        b1=0.8, eps_root=1e-7, implementation=implementation
    )
    state = opt.init(params)
    tolerances.assert_trees_equal(state, optax.scale_by_amsgrad().init(params))
    spec_state = spec.init(params)
    hp = spec.Hyperparams(learning_rate=None, b1=0.8, eps_root=1e-7)
    for s in range(3):
        grads = jax.tree.map(lambda p, s=s: jnp.cos(p + s), params)
        updates, state = jax.jit(opt.update)(grads, state)
        expected, spec_state = spec.update(grads, spec_state, hp)
        tolerances.assert_trees_ulp_close(
            (updates, tuple(state)),
            (expected, tuple(spec_state)),
            tolerances.IMPLEMENTATION_ULPS,
        )


def test_float16_gradients_are_squared_in_float32(implementation):
    """Squared in float16, |g| < 2**-12 underflows to 0 (and the update
    becomes mu / eps) and |g| > 256 overflows to inf; the precision rule
    computes in float32 and rounds once."""
    grads = jnp.array([1e-4, -3e-5, 2e-4, 300.0, -1000.0, 0.5], jnp.float16)
    params = jnp.ones_like(grads)
    check_against_spec(
        implementation, params, [grads, grads * 0.5, grads], spec.Hyperparams(0.1)
    )


def test_gpu_sqrt_is_sqrt():
    """The GPU kernel's sqrt (1 / rsqrt) against jnp.sqrt, special values too.

    The GPU branch is only lowered on a CPU machine, never run, so its one
    formula of its own is checked here directly.
    """
    x = jnp.concatenate(
        [
            jnp.array([0.0, 1.0, 4.0, jnp.inf, jnp.nan, 1e-45, 3e38]),
            jnp.logspace(-30, 30, 200),
        ]
    ).astype(jnp.float32)
    got, want = _math.sqrt_via_rsqrt(x), jnp.sqrt(x)
    assert got.dtype == want.dtype
    # rsqrt and the division round once each: within 2 ULPs of sqrt.
    assert tolerances.ulp_distance(got, want).max() <= 2


# Factories, so that importing this module creates no jax array: the mutation
# runner forks after importing the tests, and XLA's threads do not survive it.
LEARNING_RATES = {
    "float": lambda: 0.1,  # Weakly typed: the update keeps its dtype.
    "float32-array": lambda: jnp.asarray(0.1, jnp.float32),  # Lifts 16-bit.
    "bfloat16-array": lambda: jnp.asarray(0.1, jnp.bfloat16),
    "schedule-strong": lambda: optax.linear_schedule(0.1, 0.01, 10),  # float32.
    "schedule-weak": lambda: lambda count: 0.1,  # Cast, not promoted.
}


@pytest.mark.parametrize("learning_rate", list(LEARNING_RATES))
@pytest.mark.parametrize(
    "mu_dtype", strategies.MU_DTYPES, ids=lambda d: f"mu={d and jnp.dtype(d).name}"
)
@pytest.mark.parametrize(
    "dtype", strategies.PARAM_DTYPES, ids=lambda d: jnp.dtype(d).name
)
def test_output_dtypes_equal_optax(implementation, dtype, mu_dtype, learning_rate):
    """Updates and state of `update`, and params and state of `step`, have
    optax's dtypes (`update` + `apply_updates`) for every learning-rate kind."""
    kwargs = dict(learning_rate=LEARNING_RATES[learning_rate](), mu_dtype=mu_dtype)
    theirs = optax.amsgrad(**kwargs)
    ours = pallas_amsgrad.amsgrad(**kwargs, implementation=implementation)
    params = {
        "w": jax.ShapeDtypeStruct((3, 130), dtype),
        "s": jax.ShapeDtypeStruct((), dtype),
    }

    def optax_step(grads, params):
        updates, state = theirs.update(grads, theirs.init(params), params)
        return updates, state, optax.apply_updates(params, updates), state

    def our_step(grads, params):
        updates, state = ours.update(grads, ours.init(params), params)
        new_params, step_state = ours.step(grads, ours.init(params), params)
        return updates, state, new_params, step_state

    def dtypes(tree):
        return jax.tree.map(lambda x: jnp.dtype(x.dtype), tree)

    assert dtypes(jax.eval_shape(our_step, params, params)) == dtypes(
        jax.eval_shape(optax_step, params, params)
    )


HYPERPARAMETERS = {"b1": 0.9, "b2": 0.999, "eps": 1e-8, "eps_root": 0.0}


# All weakly typed (Python floats), or one a float32 array, as
# `optax.inject_hyperparams` passes them.
@pytest.mark.parametrize(
    "array", [None, *HYPERPARAMETERS], ids=lambda a: f"{a}-array" if a else "floats"
)
@pytest.mark.parametrize(
    "grad_dtype, param_dtype",
    [
        ("bfloat16", "bfloat16"),
        ("float32", "bfloat16"),
        ("bfloat16", "float32"),
        ("float16", "bfloat16"),
    ],
)
def test_output_dtypes_of_mixed_leaves_and_array_hyperparameters(
    implementation, grad_dtype, param_dtype, array
):
    """Gradients of the params' dtype or another, and each of b1, b2, eps,
    eps_root as a float32 array: over two steps (optax's first may
    widen the state), `update`'s and `step`'s outputs have optax's dtypes."""
    kwargs = {}
    if array is not None:
        kwargs[array] = jnp.asarray(HYPERPARAMETERS[array], jnp.float32)
    theirs = optax.amsgrad(0.1, **kwargs)
    ours = pallas_amsgrad.amsgrad(0.1, **kwargs, implementation=implementation)
    params = {"w": jax.ShapeDtypeStruct((3, 130), param_dtype)}
    grads = {"w": jax.ShapeDtypeStruct((3, 130), grad_dtype)}

    def two_steps(opt, fused):
        def run(grads, params):
            state, outputs = opt.init(params), []
            for _ in range(2):
                if fused:
                    params, state = opt.step(grads, state, params)
                    outputs.append((params, state))
                else:
                    updates, state = opt.update(grads, state, params)
                    params = optax.apply_updates(params, updates)
                    outputs.append((updates, params, state))
            return outputs

        return jax.tree.map(
            lambda x: jnp.dtype(x.dtype), jax.eval_shape(run, grads, params)
        )

    expected = two_steps(theirs, fused=False)
    assert two_steps(ours, fused=False) == expected
    assert two_steps(ours, fused=True) == [(p, s) for _, p, s in expected]


@pytest.mark.parametrize("array", ["b1", "b2"])
def test_float64_leaves_with_a_float32_array_decay_under_x64(implementation, array):
    """A float32-array b1 or b2 makes a float32 bias correction; optax widens
    it to the float64 moment before dividing, so its reciprocal is taken in
    float64 (in float32 it would be ~1e-8 off, millions of float64 ULPs)."""
    with jax.enable_x64(True):
        kwargs = {array: jnp.asarray(HYPERPARAMETERS[array], jnp.float32)}
        theirs = optax.amsgrad(0.01, **kwargs)
        ours = pallas_amsgrad.amsgrad(0.01, **kwargs, implementation=implementation)
        params = {"w": jnp.linspace(-1, 1, 2 * 130, dtype=jnp.float64).reshape(2, 130)}
        ours_state, theirs_state = ours.init(params), theirs.init(params)
        update = jax.jit(ours.update)
        for s in range(3):
            grads = jax.tree.map(lambda p, s=s: jnp.sin(7 * p + s), params)
            updates, ours_state = update(grads, ours_state, params)
            expected, theirs_state = theirs.update(grads, theirs_state, params)
            tolerances.assert_trees_ulp_close(
                (updates, ours_state),
                (expected, theirs_state),
                tolerances.IMPLEMENTATION_ULPS,
                f"step {s}: ",
            )
            params = optax.apply_updates(params, updates)


def test_float32_leaves_are_unchanged_by_x64(implementation):
    """x64 widens nothing of a float32 step (the hyperparameters are weakly
    typed): `update` and `step`, decay included, are bit for bit x32's. Only
    the bias corrections may differ, as optax's do (1 - b**count computed in
    float64, then rounded): b1 and b2 here make them exact in float32."""
    params = {"w": np.linspace(-1, 1, 2 * 130, dtype=np.float32).reshape(2, 130)}
    grads = {"w": np.cos(7 * params["w"])}

    def two_steps():
        opt = pallas_amsgrad.amsgrad(
            0.01,
            b1=0.875,
            b2=1 - 2**-10,
            weight_decay=0.1,
            implementation=implementation,
        )
        state, update = opt.init(params), jax.jit(opt.update)
        updates, state = update(grads, state, params)
        updates, _ = update(grads, state, params)
        new_params, _ = jax.jit(opt.step)(grads, state, params)
        return jax.tree.map(np.asarray, (updates, new_params))

    with jax.enable_x64(False):
        expected = two_steps()
    with jax.enable_x64(True):
        actual = two_steps()
    tolerances.assert_trees_equal(actual, expected)


def _complex_tree(dtype, seed):
    key_real, key_imag = jax.random.split(jax.random.key(seed))
    real = jax.random.normal(key_real, (17, 130)) * (1 + 9 * (seed % 2))
    imag = jax.random.normal(key_imag, (17, 130))
    return {
        "c": jax.lax.complex(real, imag).astype(dtype),
        "c_small": jnp.array([1 + 2j, -0.5j, 3.0], dtype) * (seed + 1),
        "r": jnp.linspace(-1, 1, 9, dtype=jnp.float32) * (seed + 1),
    }


@pytest.mark.parametrize("dtype", ["complex64", "complex128"])
def test_complex_leaves_match_spec_with_optax_dtypes(implementation, dtype):
    """Complex leaves (optax trains complex models): |g|^2 into nu, optax's
    dtypes, `update` and `step` from the same state beside the spec, three
    steps (one with a zero gradient). Complex leaves take the XLA path in
    every implementation."""
    with jax.enable_x64(dtype == "complex128"):
        params = _complex_tree(dtype, 0)
        grads = [_complex_tree(dtype, 1), jax.tree.map(jnp.zeros_like, params)]
        grads.append(_complex_tree(dtype, 2))
        hp = spec.Hyperparams(learning_rate=0.01, eps_root=1e-12)
        opt = optimizer(hp, implementation)
        reference = optax.amsgrad(0.01, eps_root=1e-12)
        state = opt.init(params)
        tolerances.assert_trees_equal(state, reference.init(params), "init: ")
        update, step = jax.jit(opt.update), jax.jit(opt.step)
        for i, g in enumerate(grads):
            context = f"step {i}: "
            updates, new_state = update(g, state, params)
            new_params, step_state = step(g, state, params)
            tolerances.assert_trees_equal(step_state, new_state, context)
            optax_updates, optax_state = reference.update(g, state, params)
            dtypes = jax.tree.map(lambda x: x.dtype, (updates, new_state))
            assert dtypes == jax.tree.map(
                lambda x: x.dtype, (optax_updates, optax_state)
            ), context
            expected_updates, expected_state = spec.update(
                g, spec.AmsgradState(*state[0]), hp
            )
            expected_params, _ = spec.step(g, spec.AmsgradState(*state[0]), params, hp)
            assert new_state[0].count == expected_state.count, context
            tolerances.assert_trees_normwise_close(
                (updates, tuple(new_state[0])[1:], new_params),
                (expected_updates, tuple(expected_state)[1:], expected_params),
                context,
            )
            assert not jnp.any(new_state[0].nu["c"].imag), "nu must stay real"
            state, params = new_state, new_params


def test_complex_model_trains_as_with_optax(implementation):
    """A complex least-squares fit, 200 steps: the same trajectory as optax's
    (within the suite's normwise bound) and the loss down a hundredfold."""
    target = jnp.array([1 + 2j, -3j, 0.5 - 0.5j, 2.0], jnp.complex64)

    def loss(params):
        z = params["z"] * params["scale"]
        return jnp.sum(jnp.abs(z - target) ** 2)

    def train(opt):
        params = {"z": jnp.zeros(4, jnp.complex64), "scale": jnp.ones((), jnp.float32)}
        state = opt.init(params)

        @jax.jit
        def train_step(params, state):
            # jax.grad of a real loss gives conj(dL/dz*): the descent
            # direction is its conjugate, as in optax's own complex tests.
            grads = jax.tree.map(jnp.conj, jax.grad(loss)(params))
            updates, state = opt.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        for _ in range(200):
            params, state = train_step(params, state)
        return params

    hp = spec.Hyperparams(learning_rate=0.05)
    ours, theirs = train(optimizer(hp, implementation)), train(optax.amsgrad(0.05))
    tolerances.assert_trees_normwise_close(ours, theirs)
    start = {"z": jnp.zeros(4, jnp.complex64), "scale": jnp.ones(())}
    assert loss(ours) < loss(start) / 100


def test_float32_leaves_under_x64(implementation):
    """With 64-bit types enabled, float32 leaves still take the kernel: its
    index arithmetic stays in int32 (lax.div/rem refuse mixed widths)."""
    with jax.enable_x64(True):
        params = {
            "w": jnp.linspace(-1, 1, 40 * 130, dtype=jnp.float32).reshape(40, 130)
        }
        grads = [
            jax.tree.map(lambda p, s=s: jnp.cos(p * (2 + s)), params) for s in range(2)
        ]
        check_against_spec(implementation, params, grads, spec.Hyperparams(0.01))


@pytest.mark.parametrize("weight_decay", [None, 0.1], ids=["plain", "decayed"])
def test_float64_params_of_float32_moments_under_x64(implementation, weight_decay):
    """float32 gradients and moments for float64 params: `update` as the
    spec's, and `step` computes the moments as `update` does (in float32, or
    with the decay, which reads the param, in float64 in both) and adds the
    update to the param in float64, bit for bit `optax.apply_updates`, not to
    the param rounded to float32."""
    with jax.enable_x64(True):
        # Steps of 2^-40 above 1: float32 would round every param to 1.
        params = {
            "w": 1 + jnp.arange(2 * 130, dtype=jnp.float64).reshape(2, 130) * 2.0**-40
        }
        hp = spec.Hyperparams(0.01, weight_decay=weight_decay)
        opt = optimizer(hp, implementation)
        state = opt.init(jax.tree.map(lambda p: p.astype(jnp.float32), params))
        update, step = jax.jit(opt.update), jax.jit(opt.step)
        for s in range(2):
            grads = {
                "w": jnp.cos(jnp.arange(2 * 130, dtype=jnp.float32) + s).reshape(2, 130)
            }
            updates, update_state = update(grads, state, params)
            expected_updates, expected_state = spec.update(
                grads, composition.spec_state_of(state, hp), hp, params
            )
            tolerances.assert_trees_ulp_close(
                (updates, update_state),
                (
                    expected_updates,
                    composition.optax_state_of(expected_state, hp, params),
                ),
                tolerances.for_recipe(
                    tolerances.IMPLEMENTATION_ULPS, clips=False, decays=hp.decays
                ),
                f"step {s}: ",
            )
            new_params, state = step(grads, state, params)
            tolerances.assert_trees_equal(state, update_state, f"step {s}: ")
            tolerances.assert_trees_equal(
                new_params, optax.apply_updates(params, updates), f"step {s}: "
            )
            params = new_params
        assert len(np.unique(np.asarray(params["w"]))) > 2 * 130 - 8
