"""Properties of the step that hold for any input, for both implementations.

Recompilation (second step, schedules, `inject_hyperparams`) is covered in
tests/test_api.py; agreement with the spec in tests/test_implementations.py.
"""

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
from implementations import check_against_spec, optimizer

import amsgrad_spec as spec
import pallas_amsgrad

INT32_MAX = np.iinfo(np.int32).max
# Stochastic rounding drawn off and on: the same properties hold for both.
BOTH = (False, True)


@given(data=st.data())
def test_nu_max_never_decreases(implementation, data):
    dtype = data.draw(st.sampled_from(strategies.PARAM_DTYPES))
    params, grads = data.draw(strategies.trajectories(dtype, steps=4))
    hp = data.draw(
        strategies.hyperparams(
            nu_dtypes=[None, *strategies.NU_DTYPES], stochastic_rounding=BOTH
        )
    )
    opt = optimizer(hp, implementation)
    state, step = opt.init(params), jax.jit(opt.step)
    for g in grads:
        params, new_state = step(g, state, params)
        for before, after in zip(
            jax.tree.leaves(state[0].nu_max),
            jax.tree.leaves(new_state[0].nu_max),
            strict=True,
        ):
            assert np.all(np.asarray(after >= before)), (before, after)
        state = new_state


@pytest.mark.parametrize("schedule", [False, True], ids=["constant", "schedule"])
def test_count_saturates_at_int32_max(implementation, schedule):
    lr = optax.constant_schedule(0.1) if schedule else 0.1
    opt = pallas_amsgrad.amsgrad(lr, implementation=implementation)
    params = jnp.ones(5)
    state = jax.tree.map(
        lambda x: jnp.full_like(x, INT32_MAX - 1) if x.dtype == jnp.int32 else x,
        opt.init(params),
    )
    step = jax.jit(opt.step)
    for expected in (INT32_MAX, INT32_MAX):
        params, state = step(jnp.full(5, 0.5), state, params)
        counts = [x for x in jax.tree.leaves(state) if x.dtype == jnp.int32]
        assert counts and all(int(c) == expected for c in counts), counts
    # At t = int32 max, 1 - b**t is exactly 1: the step is unbiased Adam's.
    assert np.all(np.isfinite(np.asarray(params)))


def _run(opt, params, grads):
    state, step = opt.init(params), jax.jit(opt.step)
    for g in grads:
        params, state = step(g, state, params)
    return params, state


@given(data=st.data())
def test_bitwise_identical_across_block_sizes_and_runs(data):
    dtype = data.draw(st.sampled_from(strategies.PARAM_DTYPES))
    mu_dtype = data.draw(st.sampled_from(strategies.MU_DTYPES))
    params, grads = data.draw(strategies.trajectories(dtype))
    hp = data.draw(
        strategies.hyperparams(
            mu_dtype, nu_dtypes=[None, *strategies.NU_DTYPES], stochastic_rounding=BOTH
        )
    )
    note(f"{hp=}")
    reference = _run(optimizer(hp, "pallas"), params, grads)
    tolerances.assert_trees_equal(
        _run(optimizer(hp, "pallas"), params, grads), reference, "rerun: "
    )
    for rows in (16, 32):
        sizes = pallas_amsgrad.BlockSizes(rows)
        tolerances.assert_trees_equal(
            _run(optimizer(hp, "pallas", sizes), params, grads),
            reference,
            f"block_rows={rows}: ",
        )


@given(data=st.data())
def test_kernel_and_xla_path_give_the_same_bits(data):
    """Both run `_math.amsgrad_block` on the same coefficients, and the suite's
    IEEE arithmetic (tests/conftest.py) leaves XLA no contraction to make:
    any other sqrt, cast or order of operations in either one shows here."""
    dtype = data.draw(st.sampled_from(strategies.PARAM_DTYPES))
    mu_dtype = data.draw(st.sampled_from(strategies.MU_DTYPES))
    params, grads = data.draw(strategies.trajectories(dtype))
    hp = data.draw(
        strategies.hyperparams(
            mu_dtype, nu_dtypes=[None, *strategies.NU_DTYPES], stochastic_rounding=BOTH
        )
    )
    note(f"{hp=}")
    kernel, xla = optimizer(hp, "pallas"), optimizer(hp, "xla")
    tolerances.assert_trees_equal(
        _run(kernel, params, grads), _run(xla, params, grads), "step: "
    )
    state = kernel.init(params)
    tolerances.assert_trees_equal(
        jax.jit(kernel.update)(grads[0], state),
        jax.jit(xla.update)(grads[0], state),
        "update: ",
    )


def _moments(state, i, subtree=lambda tree: tree):
    """(mu, nu, nu_max) of leaf i of (a subtree of) an amsgrad state."""
    return [jax.tree.leaves(subtree(tree))[i] for tree in state[0][1:]]


@given(data=st.data())
def test_leaf_alone_equals_leaf_in_a_large_tree(implementation, data):
    """No padding or neighbouring leaf leaks into a leaf's results, even
    neighbours whose gradients are NaN, inf or huge."""
    dtype = data.draw(st.sampled_from(strategies.PARAM_DTYPES))
    params, grads = data.draw(strategies.trajectories(dtype))
    mu_dtype = data.draw(st.sampled_from([None, jnp.float32]))
    hp = data.draw(strategies.hyperparams(mu_dtype))
    opt = optimizer(hp, implementation, pallas_amsgrad.BlockSizes(16))
    neighbour_shapes = [(37,), (130, 3), (2, 64, 17)]
    fills = [np.nan, np.inf, 6e4]
    neighbours = [jnp.ones(s, dtype) for s in neighbour_shapes]
    tree = {"params": params, "neighbours": neighbours}
    tree_grads = [
        {
            "params": g,
            "neighbours": [
                jnp.full(s, f, dtype)
                for s, f in zip(neighbour_shapes, fills, strict=True)
            ],
        }
        for g in grads
    ]
    together = _run(opt, tree, tree_grads)
    together_params = jax.tree.leaves(together[0]["params"])
    for i, leaf in enumerate(jax.tree.leaves(params)):
        alone = _run(opt, leaf, [jax.tree.leaves(g)[i] for g in grads])
        tolerances.assert_trees_equal(
            (alone[0], _moments(alone[1], 0)),
            (together_params[i], _moments(together[1], i, lambda t: t["params"])),
            f"leaf {i}: ",
        )


def _copies(tree):
    return [np.array(x, copy=True) for x in jax.tree.leaves(tree)]


def test_arrays_not_donated_are_never_modified(implementation):
    opt = pallas_amsgrad.amsgrad(0.1, implementation=implementation)
    params = {"w": jnp.linspace(-1, 1, 300).reshape(3, 100), "b": jnp.ones(7)}
    grads = jax.tree.map(jnp.cos, params)
    state = opt.init(params)
    state = jax.jit(opt.step)(grads, state, params)[1]  # Non-zero moments.
    before = _copies((grads, state, params))
    for fn in (jax.jit(opt.step), jax.jit(opt.update)):
        jax.block_until_ready(fn(grads, state, params))
        for a, b in zip(_copies((grads, state, params)), before, strict=True):
            np.testing.assert_array_equal(a, b)


def test_donated_arrays_are_reused(implementation):
    """Every donated param and moment buffer comes back as an output buffer."""
    opt = pallas_amsgrad.amsgrad(0.1, implementation=implementation)
    params = {"w": jnp.linspace(-1, 1, 3 * 1024).reshape(3, 1024), "b": jnp.ones(256)}
    grads = jax.tree.map(jnp.cos, params)
    state = opt.init(params)
    step = jax.jit(opt.step, donate_argnums=(1, 2))
    donated = [x for x in jax.tree.leaves((state, params)) if x.ndim]
    pointers = {x.unsafe_buffer_pointer() for x in donated}
    new_params, new_state = step(grads, state, params)
    assert all(x.is_deleted() for x in donated)
    outputs = [x for x in jax.tree.leaves((new_params, new_state)) if x.ndim]
    assert {x.unsafe_buffer_pointer() for x in outputs} == pointers


@given(data=st.data())
def test_non_finite_gradient_element_stays_local(implementation, data):
    """NaN/inf in one gradient element: the outputs that turn non-finite are
    exactly the spec's, that element's alone, and all others match the spec."""
    dtype = data.draw(st.sampled_from(strategies.PARAM_DTYPES))
    params, grads = data.draw(strategies.trajectories(dtype))
    hp = data.draw(strategies.hyperparams())
    leaves = jax.tree.leaves(grads[0])
    sizes = [leaf.size for leaf in leaves]
    leaf_index = data.draw(st.sampled_from([i for i, n in enumerate(sizes) if n]))
    element = data.draw(st.integers(0, sizes[leaf_index] - 1))
    value = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    note(f"{leaf_index=} {element=} {value=}")
    poisoned = leaves[leaf_index].reshape(-1).at[element].set(value)
    leaves[leaf_index] = poisoned.reshape(leaves[leaf_index].shape)
    grads[0] = jax.tree.unflatten(jax.tree.structure(grads[0]), leaves)

    check_against_spec(implementation, params, grads[:1], hp)
    opt = optimizer(hp, implementation)
    new_params, new_state = jax.jit(opt.step)(grads[0], opt.init(params), params)
    expected_params, expected_state = spec.step(grads[0], spec.init(params), params, hp)
    for name, got, want in [
        ("params", new_params, expected_params),
        ("mu", new_state[0].mu, expected_state.mu),
        ("nu", new_state[0].nu, expected_state.nu),
        ("nu_max", new_state[0].nu_max, expected_state.nu_max),
    ]:
        for i, (g, w) in enumerate(
            zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
        ):
            bad = ~np.isfinite(np.asarray(g, np.float64)).reshape(-1)
            np.testing.assert_array_equal(
                bad, ~np.isfinite(np.asarray(w, np.float64)).reshape(-1), name
            )
            # Only the poisoned element may be non-finite.
            allowed = np.zeros_like(bad)
            if i == leaf_index:
                allowed[element] = True
            assert not (bad & ~allowed).any(), (name, i, np.flatnonzero(bad))
