"""`optax.inject_hyperparams` over ours gives optax's state, leaf for leaf.

With default options, `inject_hyperparams(pallas_amsgrad.amsgrad)` carries
exactly the state of `inject_hyperparams(optax.amsgrad)` (and likewise for
`scale_by_amsgrad`); with the recipe's options, that of `inject_hyperparams`
over the optax composition they stand for (`composition.amsgrad`).
Checkpoints (flax's msgpack bytes restored into the other's template, and
pickle) move both ways and training continues as from one's own state.
"""

from __future__ import annotations

import pickle

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tolerances
from flax import serialization

import pallas_amsgrad
from pallas_amsgrad.tools import composition


def model_params():
    return {
        "dense": {
            "w": jnp.linspace(-1, 1, 6 * 40, dtype=jnp.float32).reshape(6, 40),
            "b": jnp.zeros(40, jnp.float32),
        },
        "scale": jnp.ones((), jnp.float32),
    }


def grads_for(params, step):
    return jax.tree.map(lambda p: jnp.cos(p * (step + 1.0) + step), params)


def decay_matrices(params):
    return jax.tree.map(lambda p: p.ndim >= 2, params)


# (ours, optax's) factories and the keyword arguments both are called with.
CASES = {
    "amsgrad": (pallas_amsgrad.amsgrad, optax.amsgrad, {"learning_rate": 0.05}),
    "amsgrad-mu-bfloat16": (
        pallas_amsgrad.amsgrad,
        optax.amsgrad,
        # A string: inject_hyperparams takes a dtype class for a schedule.
        {"learning_rate": 0.05, "mu_dtype": "bfloat16"},
    ),
    "amsgrad-schedule": (
        pallas_amsgrad.amsgrad,
        optax.amsgrad,
        {"learning_rate": optax.linear_schedule(0.05, 0.01, 4), "b1": 0.8},
    ),
    "scale_by_amsgrad": (pallas_amsgrad.scale_by_amsgrad, optax.scale_by_amsgrad, {}),
    "recipe": (
        pallas_amsgrad.amsgrad,
        composition.amsgrad,
        {
            "learning_rate": 0.05,
            "weight_decay": 0.1,
            "mask": decay_matrices,
            "max_grad_norm": 1.0,
            "max_consecutive_errors": 2,
        },
    ),
    "recipe-decay-only": (
        pallas_amsgrad.amsgrad,
        composition.amsgrad,
        {"learning_rate": 0.05, "weight_decay": 1e-2},
    ),
    "recipe-clip-only": (
        pallas_amsgrad.amsgrad,
        composition.amsgrad,
        {"learning_rate": 0.05, "max_grad_norm": 0.5},
    ),
}


def injected(case, implementation=None):
    """(ours, theirs) under inject_hyperparams, `mask` static in both."""
    ours_factory, theirs_factory, kwargs = CASES[case]
    static = ("mask",) if "mask" in kwargs else ()
    ours_kwargs = dict(kwargs)
    if implementation is not None:
        ours_kwargs["implementation"] = implementation
    ours = optax.inject_hyperparams(
        ours_factory, static_args=(*static, "implementation")
    )(**ours_kwargs)
    theirs = optax.inject_hyperparams(theirs_factory, static_args=static)(**kwargs)
    return ours, theirs


def assert_same_state(ours, theirs):
    """Structure, node types, hyperparams, leaf dtypes and values: exact."""
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    assert ours.hyperparams.keys() == theirs.hyperparams.keys()
    for (path, a), b in zip(
        jax.tree_util.tree_flatten_with_path(ours)[0],
        jax.tree.leaves(theirs),
        strict=True,
    ):
        where = jax.tree_util.keystr(path)
        assert a.dtype == b.dtype, f"{where}: {a.dtype} != {b.dtype}"
        np.testing.assert_array_equal(a, b, err_msg=where)


@pytest.mark.parametrize("case", list(CASES))
def test_init_is_optax_state_exactly(case):
    ours, theirs = injected(case)
    params = model_params()
    assert_same_state(ours.init(params), theirs.init(params))


def test_defaults_inject_only_optax_hyperparams():
    """The options' defaults are None (or flags), which inject leaves alone."""
    state = optax.inject_hyperparams(pallas_amsgrad.amsgrad)(0.1).init(model_params())
    assert sorted(state.hyperparams) == ["b1", "b2", "eps", "eps_root", "learning_rate"]
    state = optax.inject_hyperparams(pallas_amsgrad.scale_by_amsgrad)().init(
        model_params()
    )
    assert sorted(state.hyperparams) == ["b1", "b2", "eps", "eps_root"]


def test_options_given_are_injected():
    """A seed or weight_decay given becomes a hyperparam, as in optax."""
    state = optax.inject_hyperparams(pallas_amsgrad.amsgrad)(
        0.1, stochastic_rounding=True, seed=3, weight_decay=0.0
    ).init(model_params())
    assert int(state.hyperparams["seed"]) == 3
    assert float(state.hyperparams["weight_decay"]) == 0.0
    # Any weight_decay but None adds the decay term, a zero too: injected it
    # is an array that inject_hyperparams can change.
    assert len(state.inner_state) == 3
    assert len(pallas_amsgrad.amsgrad(0.1, weight_decay=0.0).init(model_params())) == 3


@pytest.mark.parametrize("case", ["amsgrad", "amsgrad-schedule", "recipe"])
def test_updates_and_states_track_optax(case, implementation):
    ours, theirs = injected(case, implementation)
    params = model_params()
    ours_state, theirs_state = ours.init(params), theirs.init(params)
    update = jax.jit(ours.update)
    for step in range(3):
        grads = grads_for(params, step)
        if case == "recipe" and step == 1:  # The finite guard skips it.
            grads["dense"]["b"] = grads["dense"]["b"].at[0].set(jnp.nan)
        our_updates, ours_state = update(grads, ours_state, params)
        their_updates, theirs_state = theirs.update(grads, theirs_state, params)
        tolerances.assert_trees_normwise_close(
            our_updates, their_updates, f"step {step}: "
        )
        tolerances.assert_trees_normwise_close(
            ours_state, theirs_state, f"step {step}: "
        )
    assert update._cache_size() == 1


def _continue(opt, state, params, step):
    update = jax.jit(opt.update)
    return update(grads_for(params, step), state, params)


@pytest.mark.parametrize("case", ["amsgrad", "scale_by_amsgrad", "recipe"])
@pytest.mark.parametrize("direction", ["ours-to-optax", "optax-to-ours"])
@pytest.mark.parametrize("checkpoint", ["flax-msgpack", "pickle"])
def test_checkpoints_move_both_ways(case, direction, checkpoint):
    """A state saved by one restores into the other's `init` template and
    training goes on as from the other's own state."""
    ours, theirs = injected(case, "xla")
    source, target = (ours, theirs) if direction == "ours-to-optax" else (theirs, ours)
    params = model_params()
    state = source.init(params)
    for step in range(2):
        _, state = _continue(source, state, params, step)
    if checkpoint == "flax-msgpack":
        restored = serialization.from_bytes(
            target.init(params), serialization.to_bytes(state)
        )
    else:
        restored = pickle.loads(pickle.dumps(state))
    assert jax.tree.structure(restored) == jax.tree.structure(target.init(params))
    assert_same_state(restored, state)
    updates, new_state = _continue(target, restored, params, 2)
    reference_updates, reference_state = _continue(source, state, params, 2)
    tolerances.assert_trees_normwise_close(updates, reference_updates)
    tolerances.assert_trees_normwise_close(new_state, reference_state)
