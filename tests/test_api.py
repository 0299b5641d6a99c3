"""Drop-in behaviour with optax: state, chain, inject_hyperparams, MultiSteps."""

from __future__ import annotations

import copy
import doctest
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tolerances

import amsgrad_spec as spec
import pallas_amsgrad


def model_params(dtype=jnp.float32):
    return {
        "dense": {
            "w": jnp.linspace(-1, 1, 6 * 40, dtype=dtype).reshape(6, 40),
            "b": jnp.zeros(40, dtype),
        },
        "scale": jnp.ones((), dtype),
    }


def grads_for(params, step):
    return jax.tree.map(
        lambda p: jnp.cos(p * (step + 1.0) + step).astype(p.dtype), params
    )


def assert_updates_track_optax(ours, theirs, params, steps):
    """Our transformation (jitted) and optax's give the same updates each step."""
    ours_state, theirs_state = ours.init(params), theirs.init(params)
    our_update = jax.jit(ours.update)
    for step in range(steps):
        grads = grads_for(params, step)
        our_updates, ours_state = our_update(grads, ours_state, params)
        their_updates, theirs_state = theirs.update(grads, theirs_state, params)
        tolerances.assert_trees_normwise_close(
            our_updates, their_updates, f"step {step}: "
        )


@pytest.mark.parametrize(
    "learning_rate",
    [0.01, optax.linear_schedule(0.01, 0.0, 10)],
    ids=["constant", "schedule"],
)
@pytest.mark.parametrize("mu_dtype", [None, jnp.bfloat16])
def test_init_is_optax_state_exactly(learning_rate, mu_dtype):
    params = model_params()
    ours = pallas_amsgrad.amsgrad(learning_rate, mu_dtype=mu_dtype).init(params)
    theirs = optax.amsgrad(learning_rate, mu_dtype=mu_dtype).init(params)
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    assert [type(s) for s in ours] == [type(s) for s in theirs]
    tolerances.assert_trees_equal(ours, theirs)


def test_checkpoints_move_both_ways(implementation):
    """optax state -> our update, and our state -> optax update, agree."""
    params = model_params()
    ours = pallas_amsgrad.amsgrad(0.01, implementation=implementation)
    theirs = optax.amsgrad(0.01)
    state = theirs.init(params)
    for step in range(2):
        _, state = theirs.update(grads_for(params, step), state)
    our_updates, our_state = jax.jit(ours.update)(grads_for(params, 2), state)
    reference_updates, reference_state = theirs.update(grads_for(params, 2), state)
    tolerances.assert_trees_normwise_close(our_updates, reference_updates)
    # ... and optax continues from our state as from its own.
    their_updates, _ = theirs.update(grads_for(params, 3), our_state)
    reference_updates, _ = theirs.update(grads_for(params, 3), reference_state)
    tolerances.assert_trees_normwise_close(their_updates, reference_updates)


def test_init_accepts_abstract_params():
    abstract = jax.tree.map(
        lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), model_params(jnp.bfloat16)
    )
    state = pallas_amsgrad.amsgrad(0.1, mu_dtype=jnp.float32).init(abstract)
    assert state[0].mu["dense"]["w"].dtype == jnp.float32
    assert state[0].nu["dense"]["w"].dtype == jnp.bfloat16
    assert state[0].nu_max["scale"].shape == ()
    shapes = jax.eval_shape(pallas_amsgrad.amsgrad(0.1).init, abstract)
    assert shapes[0].mu["dense"]["b"].shape == (40,)


def test_chain_with_clipping_matches_optax(implementation):
    params = model_params()
    ours = optax.chain(
        optax.clip_by_global_norm(1.0),
        pallas_amsgrad.amsgrad(0.05, implementation=implementation),
    )
    theirs = optax.chain(optax.clip_by_global_norm(1.0), optax.amsgrad(0.05))
    assert_updates_track_optax(ours, theirs, params, steps=3)


def test_inject_hyperparams_changes_lr_without_recompiling(implementation):
    params = model_params()
    ours = optax.inject_hyperparams(
        pallas_amsgrad.amsgrad, static_args=("implementation",)
    )(learning_rate=0.1, implementation=implementation)
    theirs = optax.inject_hyperparams(optax.amsgrad)(learning_rate=0.1)
    ours_state, theirs_state = ours.init(params), theirs.init(params)
    update = jax.jit(ours.update)
    for step, lr in enumerate([0.1, 0.01, 0.3]):
        ours_state.hyperparams["learning_rate"] = jnp.asarray(lr)
        theirs_state.hyperparams["learning_rate"] = jnp.asarray(lr)
        grads = grads_for(params, step)
        our_updates, ours_state = update(grads, ours_state, params)
        their_updates, theirs_state = theirs.update(grads, theirs_state, params)
        tolerances.assert_trees_normwise_close(our_updates, their_updates)
    assert update._cache_size() == 1


def test_schedule_does_not_recompile(implementation):
    opt = pallas_amsgrad.amsgrad(
        optax.exponential_decay(0.1, 1, 0.5), implementation=implementation
    )
    params = model_params()
    state = opt.init(params)
    step = jax.jit(opt.step)
    for i in range(3):
        params, state = step(grads_for(params, i), state, params)
    assert step._cache_size() == 1
    assert int(state[1].count) == 3 and int(state[0].count) == 3


def test_multi_steps_matches_optax(implementation):
    params = model_params()
    ours = optax.MultiSteps(
        pallas_amsgrad.amsgrad(0.05, implementation=implementation), every_k_schedule=2
    )
    theirs = optax.MultiSteps(optax.amsgrad(0.05), every_k_schedule=2)
    assert_updates_track_optax(ours, theirs, params, steps=4)


def test_step_with_donation_trains(implementation):
    """The fused step under jit with donated params and state minimises a loss."""

    def loss(params):
        return jnp.sum((params["dense"]["w"] - 0.5) ** 2) + params["scale"] ** 2

    opt = pallas_amsgrad.amsgrad(0.05, implementation=implementation)
    params = model_params()
    state = opt.init(params)

    @jax.jit
    def train_step(params, state):
        return opt.step(jax.grad(loss)(params), state, params)

    train_step = jax.jit(train_step, donate_argnums=(0, 1))
    start = float(loss(params))
    for _ in range(30):
        params, state = train_step(params, state)
    assert float(loss(params)) < 0.2 * start


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks the CPU default")
def test_default_implementation_on_cpu_is_xla():
    params = model_params()

    def traced(implementation):
        opt = pallas_amsgrad.amsgrad(0.01, implementation=implementation)
        return str(jax.make_jaxpr(opt.update)(grads_for(params, 0), opt.init(params)))

    assert "pallas_call" in traced("pallas")
    assert "pallas_call" not in traced(None)


def test_scale_by_amsgrad_state_is_optax():
    params = model_params()
    ours = pallas_amsgrad.scale_by_amsgrad(mu_dtype=jnp.bfloat16).init(params)
    theirs = optax.scale_by_amsgrad(mu_dtype=jnp.bfloat16).init(params)
    assert type(ours) is type(theirs)
    tolerances.assert_trees_equal(ours, theirs)


@pytest.mark.parametrize(
    "module",
    [pallas_amsgrad._transform, pallas_amsgrad._implementations],
    ids=lambda m: m.__name__,
)
def test_docstring_examples(module):
    failures, tried = doctest.testmod(module, verbose=False)
    assert tried > 0 and failures == 0


def test_implementation_for_is_public():
    assert "implementation_for" in pallas_amsgrad.__all__
    cpu = jax.devices("cpu")[0]
    assert pallas_amsgrad.implementation_for(cpu) == pallas_amsgrad.Xla()


def test_doc_example_matches_spec():
    opt = pallas_amsgrad.amsgrad(learning_rate=0.003)
    params = jnp.array([1.0, 2.0, 3.0])
    new_params, _ = opt.step(2 * params, opt.init(params), params)
    expected, _ = spec.step(
        2 * params, spec.init(params), params, spec.Hyperparams(0.003)
    )
    np.testing.assert_array_equal(new_params, expected)


# Module-level, so that pickle can refer to them by name.
def _init(params):
    return ()


def _update(updates, state, params=None):
    return updates, state


def _step(grads, state, params):
    return params, state


@pytest.mark.parametrize(
    "duplicate",
    [copy.copy, copy.deepcopy, lambda t: pickle.loads(pickle.dumps(t))],
    ids=["copy", "deepcopy", "pickle"],
)
def test_step_survives_copies(duplicate):
    transformation = pallas_amsgrad.GradientTransformationWithStep(
        _init, _update, _step
    )
    duplicated = duplicate(transformation)
    assert type(duplicated) is pallas_amsgrad.GradientTransformationWithStep
    assert (duplicated.init, duplicated.update, duplicated.step) == (
        _init,
        _update,
        _step,
    )


def test_step_survives_replace():
    opt = pallas_amsgrad.amsgrad(0.1)
    replaced = opt._replace(update=_update)
    assert replaced.update is _update
    assert replaced.init is opt.init and replaced.step is opt.step
    assert opt._replace(step=_step).step is _step
    with pytest.raises(ValueError, match="unexpected field names"):
        opt._replace(learning_rate=0.2)


def test_with_step_is_an_optax_transformation():
    """A pair (init, update) where optax unpacks one, with `step` beside it."""
    opt = pallas_amsgrad.amsgrad(0.1)
    assert isinstance(opt, optax.GradientTransformationExtraArgs)
    assert isinstance(opt, optax.GradientTransformation)
    init, update = opt
    assert (init, update) == (opt.init, opt.update) and callable(opt.step)
    assert "step=" in repr(opt)
    chained = optax.chain(optax.clip(1.0), opt)
    params = model_params()
    updates, _ = chained.update(grads_for(params, 0), chained.init(params), params)
    assert jax.tree.structure(updates) == jax.tree.structure(params)
