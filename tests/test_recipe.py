"""The training recipe's options (clipping, masked weight decay, non-finite
skips) on every implementation: against the spec per step, against the optax
composition over a run, and their state, dtypes and bookkeeping."""

from __future__ import annotations

import dataclasses

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
from pallas_amsgrad import _recipe
from pallas_amsgrad.tools import composition

# Enough for a run of bad steps past max_consecutive_errors=1 and a step after.
RECIPE_STEPS = 4


@strategies.a_third_of_the_examples()
@given(data=st.data())
@pytest.mark.parametrize(
    "mu_dtype", strategies.MU_DTYPES, ids=lambda d: f"mu={d and jnp.dtype(d).name}"
)
@pytest.mark.parametrize(
    "dtype", strategies.PARAM_DTYPES, ids=lambda d: jnp.dtype(d).name
)
def test_recipe_matches_spec(implementation, dtype, mu_dtype, data):
    """Every option drawn, over steps with NaN and inf gradients among them."""
    params, grads = data.draw(
        strategies.non_finite_steps(
            data.draw(strategies.trajectories(dtype, steps=RECIPE_STEPS))
        )
    )
    hp = data.draw(strategies.recipes(data.draw(strategies.hyperparams(mu_dtype))))
    note(f"{hp=}")
    check_against_spec(implementation, params, grads, hp)


def _model_params():
    keys = jax.random.split(jax.random.key(0), 3)
    return {
        "dense": {
            "w": jax.random.normal(keys[0], (16, 32)),
            "b": jnp.zeros(32),
        },
        "out": {"w": jax.random.normal(keys[1], (32, 4)), "b": jnp.zeros(4)},
    }


def _loss(params, x, y):
    hidden = jnp.tanh(x @ params["dense"]["w"] + params["dense"]["b"])
    return jnp.mean((hidden @ params["out"]["w"] + params["out"]["b"] - y) ** 2)


# Both schedules counted: the decay's inside its mask's state.
RECIPE = spec.Hyperparams(
    learning_rate=optax.cosine_decay_schedule(3e-3, 100),
    weight_decay=optax.linear_schedule(0.1, 0.02, 100),
    mask=lambda tree: jax.tree.map(lambda x: x.ndim >= 2, tree),
    max_grad_norm=0.5,
    max_consecutive_errors=2,
)


def _bits(tree):
    return [
        np.asarray(x).view(f"uint{x.dtype.itemsize * 8}") for x in jax.tree.leaves(tree)
    ]


def test_skipped_steps_change_nothing_until_given_up(implementation):
    """Two NaN steps in a row are skipped: params (-0.0 included) and moments
    bit for bit as they were, zero updates, every count held; the third is
    applied (the guard gives up); a finite step resets the run."""
    hp = dataclasses.replace(RECIPE, max_consecutive_errors=2)
    opt = optimizer(hp, implementation)
    params = {"w": jnp.array([[-0.0, 1.5, -2.0], [0.0, 3.0, -1.0]]), "b": -jnp.ones(3)}
    state = opt.init(params)
    step, update = jax.jit(opt.step), jax.jit(opt.update)
    good = jax.tree.map(lambda p: jnp.full_like(p, 0.25), params)
    bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), good)
    params, state = step(good, state, params)
    for skipped in (1, 2):
        updates, update_state = update(bad, state, params)
        new_params, new_state = step(bad, state, params)
        tolerances.assert_trees_equal(update_state, new_state)
        assert all(
            np.array_equal(a, b)
            for a, b in zip(_bits(new_params), _bits(params), strict=True)
        )
        for leaf in jax.tree.leaves(updates):
            np.testing.assert_array_equal(leaf, np.zeros_like(leaf))
        assert all(
            np.array_equal(a, b)
            for a, b in zip(
                _bits(new_state.inner_state), _bits(state.inner_state), strict=True
            )
        )
        assert int(new_state.notfinite_count) == skipped
        assert int(new_state.total_notfinite) == skipped
        assert not bool(new_state.last_finite)
        params, state = new_params, new_state
    count = int(composition.amsgrad_state(state, hp).count)
    params, state = step(bad, state, params)  # A third in a row: applied.
    assert int(composition.amsgrad_state(state, hp).count) == count + 1
    assert int(state.inner_state[-1].count) == count + 1  # The schedule's too.
    assert np.isnan(np.asarray(params["w"])).any()
    _, state = step(good, state, params)
    assert int(state.notfinite_count) == 0 and int(state.total_notfinite) == 3
    assert bool(state.last_finite)


# Each layout of the composition's chain state (which parts are there, and
# which hold a count), with values that make each option act where it can.
CHAIN_LAYOUTS = {
    "clip-not-reached": {"max_grad_norm": 1e6},  # Scales nothing.
    "clip": {"max_grad_norm": 0.5},
    "decay": {"weight_decay": 0.05},
    "masked-decay": {"weight_decay": 0.05, "mask": {"w": True, "b": False}},
    "scheduled-decay": {"weight_decay": optax.linear_schedule(0.1, 0.0, 4)},
    "masked-scheduled-decay": {
        "weight_decay": optax.linear_schedule(0.1, 0.0, 4),
        "mask": {"w": True, "b": False},
    },
    "skip": {"max_consecutive_errors": 1},
}


@pytest.mark.parametrize("layout", list(CHAIN_LAYOUTS))
@pytest.mark.parametrize("learning_rate", ["float", "schedule"])
def test_each_chain_layout_matches_spec(implementation, learning_rate, layout):
    """One option at a time, with a constant or scheduled learning rate: each
    part of the chain's state is read and advanced where it sits, over three
    steps where the schedules' values change."""
    hp = spec.Hyperparams(
        learning_rate=0.05
        if learning_rate == "float"
        else optax.linear_schedule(0.1, 0.01, 3),
        **CHAIN_LAYOUTS[layout],
    )
    keys = jax.random.split(jax.random.key(3), 5)
    params = {
        "w": jax.random.normal(keys[0], (4, 6)),
        "b": jax.random.normal(keys[1], (6,)),
    }
    grads = [
        jax.tree.map(lambda p, k=k: jax.random.normal(k, p.shape), params)
        for k in keys[2:]
    ]
    check_against_spec(implementation, params, grads, hp)


def test_clipping_with_zero_gradients(implementation):
    """A global norm of zero is below any bound: nothing is scaled, no NaN."""
    hp = spec.Hyperparams(0.1, max_grad_norm=1.0, weight_decay=0.01)
    params = {"w": jnp.linspace(-1, 1, 12).reshape(3, 4), "b": jnp.ones(5)}
    zeros = jax.tree.map(jnp.zeros_like, params)
    check_against_spec(implementation, params, [zeros, zeros], hp)


def test_clipping_at_an_infinite_bound_where_the_norm_overflows(implementation):
    """max_grad_norm=inf scales nothing while the norm is finite. Finite
    gradients whose sum of squares overflows float32 have an infinite norm,
    and optax's composition scales them by inf/inf: NaN updates, as here,
    not the gradients taken unclipped."""
    hp = spec.Hyperparams(0.1, max_grad_norm=jnp.inf)
    params = {"w": jnp.linspace(-1, 1, 12).reshape(3, 4)}
    grads = {"w": jnp.full((3, 4), 1e20, jnp.float32)}
    for opt in (optimizer(hp, implementation), composition.optimizer(hp)):
        updates, _ = jax.jit(opt.update)(grads, opt.init(params), params)
        assert np.isnan(np.asarray(updates["w"])).all(), opt
    hp = dataclasses.replace(hp, max_grad_norm=1.0)  # A finite bound: finite.
    check_against_spec(implementation, params, [grads], hp)


def test_global_norm_is_optaxs_in_float32_and_complex64_under_x64():
    """The clip's global norm sums each leaf's |g|^2 in the leaf's dtype
    promoted to at least float32, as optax's does, x64 or not: the same bits
    as `optax.tree.norm`, real and complex leaves alike."""
    rng = np.random.default_rng(5)
    grads = {
        "w": rng.normal(size=(7, 33)).astype(np.float32),
        "h": rng.normal(size=(40,)).astype(np.float16),
        "z": (rng.normal(size=(9,)) + 1j * rng.normal(size=(9,))).astype(np.complex64),
    }
    for x64 in (False, True):
        with jax.enable_x64(x64):
            tree = jax.tree.map(jnp.asarray, grads)
            norm, finite = _recipe.global_norm_and_finiteness(tree)
            assert norm.dtype == jnp.float32 and bool(finite)
            expected = optax.tree.norm(
                jax.tree.map(
                    lambda g: g.astype(jnp.promote_types(g.dtype, jnp.float32)), tree
                )
            )
            np.testing.assert_array_equal(np.asarray(norm), np.asarray(expected))


@pytest.mark.parametrize("fused", [False, True], ids=["update", "step"])
def test_recipe_trains_as_optax_composition(implementation, fused):
    """The recipe before any give-up: 60 steps with NaN steps 10 and 30
    skipped, params and state on the composition's trajectory."""
    params = reference_params = _model_params()
    opt, ref = optimizer(RECIPE, implementation), composition.optimizer(RECIPE)
    state, ref_state = opt.init(params), ref.init(params)
    x = jax.random.normal(jax.random.key(1), (64, 16))
    y = jnp.sin(x[:, :4])
    grad = jax.jit(jax.grad(_loss))
    run = jax.jit(opt.step if fused else opt.update)
    ref_update = jax.jit(ref.update)
    for step in range(60):
        grads, ref_grads = grad(params, x, y), grad(reference_params, x, y)
        if step in (10, 30):
            grads, ref_grads = (
                jax.tree.map(lambda g: g * jnp.inf, tree) for tree in (grads, ref_grads)
            )
        if fused:
            params, state = run(grads, state, params)
        else:
            updates, state = run(grads, state, params)
            params = optax.apply_updates(params, updates)
        ref_updates, ref_state = ref_update(ref_grads, ref_state, reference_params)
        reference_params = optax.apply_updates(reference_params, ref_updates)
    assert int(state.total_notfinite) == 2 and int(state.notfinite_count) == 0
    assert _loss(params, x, y) < 0.5 * _loss(_model_params(), x, y)
    tolerances.assert_trees_normwise_close(params, reference_params, "params: ")
    tolerances.assert_trees_normwise_close(state, ref_state, "state: ")


WEIGHT_DECAYS = {
    "float": lambda: 0.1,  # Weakly typed: the update keeps its dtype.
    "float32-array": lambda: jnp.asarray(0.1, jnp.float32),  # Lifts 16-bit.
    "schedule": lambda: optax.linear_schedule(0.1, 0.0, 10),  # float32 values.
}


@pytest.mark.parametrize("weight_decay", list(WEIGHT_DECAYS))
@pytest.mark.parametrize("learning_rate", ["float", "schedule"])
@pytest.mark.parametrize(
    "mu_dtype", strategies.MU_DTYPES, ids=lambda d: f"mu={d and jnp.dtype(d).name}"
)
@pytest.mark.parametrize(
    "dtype", strategies.PARAM_DTYPES, ids=lambda d: jnp.dtype(d).name
)
def test_recipe_output_dtypes_equal_optax_composition(
    implementation, dtype, mu_dtype, learning_rate, weight_decay
):
    """Updates, state and applied params of the clipped, decayed composition,
    abstractly. (With skips optax's `apply_if_finite` fails wherever the
    update's dtype differs from the gradients'; the skip changes no dtype.)"""
    hp = spec.Hyperparams(
        learning_rate=0.1
        if learning_rate == "float"
        else optax.linear_schedule(0.1, 0.01, 10),
        mu_dtype=mu_dtype,
        weight_decay=WEIGHT_DECAYS[weight_decay](),
        mask={"w": True, "b": False},
        max_grad_norm=1.0,
    )
    params = {
        "w": jax.ShapeDtypeStruct((3, 5), dtype),
        "b": jax.ShapeDtypeStruct((5,), dtype),
    }

    def run(opt, fused):
        def one_step(grads, params):
            state = opt.init(params)
            if fused:
                return opt.step(grads, state, params)
            updates, state = opt.update(grads, state, params)
            return updates, state, optax.apply_updates(params, updates)

        return jax.eval_shape(one_step, params, params)

    def dtypes(tree):
        return jax.tree.map(lambda x: x.dtype, tree)

    reference_update = run(composition.optimizer(hp), fused=False)
    opt = optimizer(hp, implementation)
    assert dtypes(run(opt, fused=False)) == dtypes(reference_update)
    new_params, new_state = run(opt, fused=True)
    assert dtypes((new_params, new_state)) == dtypes(reference_update[2:0:-1])
