"""The spec's training-recipe options against the optax composition they
mirror (tests/composition.py): clipping, masked weight decay, non-finite skips."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import strategies
import tolerances
from hypothesis import given, note
from hypothesis import strategies as st

import amsgrad_spec as spec
from pallas_amsgrad.tools import composition

RECIPE_STEPS = 5  # Enough for a run of bad steps past max_consecutive_errors=2.


def run_reference(hp, params, grads_per_step):
    """The optax composition with apply_updates: [(updates, state, params)]."""
    opt = composition.optimizer(hp)
    state = opt.init(params)
    update, apply_updates = jax.jit(opt.update), jax.jit(optax.apply_updates)
    out = []
    for grads in grads_per_step:
        updates, state = update(grads, state, params)
        params = apply_updates(params, updates)
        out.append((updates, state, params))
    return out


def run_spec(hp, params, grads_per_step, fused):
    """The spec over the same steps; its state shown as the composition's."""
    state = spec.init_state(params, hp)
    update = jax.jit(spec.update, static_argnums=2)
    step = jax.jit(spec.step, static_argnums=3)
    out = []
    for grads in grads_per_step:
        updates, new_state = update(grads, state, hp, params)
        if fused:
            params, fused_state = step(grads, state, params, hp)
            tolerances.assert_trees_equal(fused_state, new_state, "step vs update: ")
        else:
            params = spec.apply(params, updates)
        state = new_state
        out.append((updates, composition.optax_state_of(state, hp, params), params))
    return out


@given(data=st.data())
@pytest.mark.parametrize(
    "mu_dtype", [None, jnp.float32], ids=["mu=param", "mu=float32"]
)
def test_float32_recipe_equals_optax_composition_bitwise(mu_dtype, data):
    """Updates, every part of the state and the params, bit for bit, over
    steps with NaN and inf gradients among them."""
    params, grads = data.draw(
        strategies.non_finite_steps(
            data.draw(strategies.trajectories(jnp.float32, steps=RECIPE_STEPS))
        )
    )
    hp = data.draw(strategies.recipes(data.draw(strategies.hyperparams(mu_dtype))))
    note(f"{hp=}")
    expected = run_reference(hp, params, grads)
    for fused in (False, True):
        actual = run_spec(hp, params, grads, fused)
        for step, (a, e) in enumerate(zip(actual, expected, strict=True)):
            context = f"step {step} fused={fused}: "
            a_updates, a_state, a_params = a
            e_updates, e_state, e_params = e
            tolerances.assert_trees_equal(a_state, e_state, context + "state: ")
            tolerances.assert_trees_equal(a_updates, e_updates, context + "updates: ")
            if fused:  # A skipped step keeps -0.0 where optax adds +0.0.
                jax.tree.map(np.testing.assert_array_equal, a_params, e_params)
            else:
                tolerances.assert_trees_equal(a_params, e_params, context)
