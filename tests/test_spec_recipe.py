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


def test_init_state_takes_each_option():
    """`init_state` passes mu_dtype, nu_dtype and the quantization block to
    `init`, and starts the finite guard with no errors and the last step
    finite, as `optax.apply_if_finite` does."""
    params = {"big": jnp.ones((8, 512), jnp.float32), "small": jnp.ones(3)}
    guarded = spec.init_state(
        params,
        spec.Hyperparams(
            0.1, mu_dtype=jnp.bfloat16, nu_dtype=jnp.float16, max_consecutive_errors=2
        ),
    )
    assert isinstance(guarded, spec.FiniteGuardState)
    for name in ("notfinite_count", "total_notfinite"):
        assert getattr(guarded, name).dtype == jnp.int32
        assert getattr(guarded, name) == 0
    assert guarded.last_finite.dtype == jnp.bool_
    assert guarded.last_finite
    inner = guarded.inner_state
    assert [x.dtype for x in jax.tree.leaves(inner.mu)] == [jnp.bfloat16] * 2
    assert [x.dtype for x in jax.tree.leaves(inner.nu)] == [jnp.float16] * 2
    assert [x.dtype for x in jax.tree.leaves(inner.nu_max)] == [jnp.float16] * 2

    quantized = spec.init_state(
        params,
        spec.Hyperparams(
            0.1, mu_dtype=jnp.int8, nu_dtype=jnp.uint8, quantization_block=128
        ),
    )
    assert isinstance(quantized, spec.AmsgradState)
    for moment, codes in ((quantized.mu, jnp.int8), (quantized.nu, jnp.uint8)):
        assert moment["big"].codes.dtype == codes
        assert moment["big"].scales.shape == (8, 512 // 128)
        assert moment["small"].dtype == jnp.float32  # Too small to quantize.


def test_clip_at_exactly_its_bound_scales_as_optax():
    """At norm == max_norm optax scales (its test is norm < max_norm), which
    moves a last bit here."""
    grads = {"w": jnp.array([3.0, 4.0, 0.3, 0.7, 1.1], jnp.float32)}
    norm = spec.global_norm(grads)
    clip = optax.clip_by_global_norm(float(norm))  # float32 -> float: exact.
    expected, _ = clip.update(grads, clip.init(grads))
    actual = {"w": spec.clip(grads["w"], norm, float(norm))}
    assert not np.array_equal(expected["w"], grads["w"])
    tolerances.assert_trees_equal(actual, expected)


def test_global_norm_is_optaxs_in_float32_and_complex64_under_x64():
    """x64 widens nothing: each leaf's sum is in its own compute dtype."""
    with jax.enable_x64(True):
        grads = {
            "a": jnp.linspace(-1, 1, 33, dtype=jnp.float32) * 3.3,
            "c": (jnp.linspace(0, 1, 7) * (1 + 2j)).astype(jnp.complex64),
        }
        tolerances.assert_trees_equal(spec.global_norm(grads), optax.tree.norm(grads))


@pytest.mark.parametrize("callable_mask", [False, True], ids=["tree", "callable"])
def test_decay_mask_spreads_each_flag_over_its_subtree(callable_mask):
    """A mask (or a callable's) is a prefix of the gradients: each flag
    covers its whole subtree, in the gradients' leaf order."""
    grads = {"bias": jnp.ones(2), "layer": {"a": jnp.ones(3), "b": jnp.ones(())}}
    mask = {"bias": False, "layer": True}
    hp = spec.Hyperparams(
        0.1, weight_decay=0.1, mask=(lambda _: mask) if callable_mask else mask
    )
    assert spec.decay_mask(grads, hp) == [False, True, True]
