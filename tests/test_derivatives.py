"""Derivatives through `update` and `step`, on every implementation.

A kernel that writes in place has no derivative of its own: a step's
derivatives are the XLA path's (`_sharding.per_shard`), and the XLA path's
are optax's. So `jax.grad`, `jax.jvp` and `jax.vjp` through the optimizer
give optax's derivatives within float32 rounding on every implementation, and
a kernel gives the XLA path's.
"""

from __future__ import annotations

import functools

import exporting
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tolerances
from implementations import gpu_interpreted, optimizer, tpu_interpreted

import amsgrad_spec as spec
import pallas_amsgrad
from pallas_amsgrad.tools import composition

XLA = pallas_amsgrad.Xla()
FUSED = {"update": False, "step": True}
HYPERPARAMS = {
    "learning_rate": 0.1,
    "b1": 0.9,
    "b2": 0.99,
    "eps": 1e-3,
    "eps_root": 1e-8,
}
# The training recipe, every option on: a clip that bites (the gradients'
# norm is about 3), a masked decay, skips (of no step here).
RECIPE = {"weight_decay": 0.1, "max_grad_norm": 1.0}
RECIPE_OPTIONS = {"mask": {"w": True, "b": False}, "max_consecutive_errors": 2}
WARM_COUNT = 2  # The steps start from a state this many steps in.


def _params(dtype=jnp.float32, b_dtype=None):
    return {
        "w": jnp.linspace(-1, 1, 15, dtype=dtype).reshape(3, 5),
        "b": jnp.linspace(0.5, 2, 7, dtype=b_dtype or dtype),
    }


def _grads_at(params, step, offsets):
    """A step's gradients: a function of the params, so that derivatives
    flow through them too, plus `offsets` (the gradients' own variable)."""
    return jax.tree.map(
        lambda p, o: (jnp.sin(3 * p + step) + o).astype(p.dtype), params, offsets
    )


def _warm_moments(params, mu_dtype=None):
    """(mu, nu, nu_max) at `WARM_COUNT`; where p > 0, nu_max is above the next
    step's nu / (1 - b2**3), so it is kept there and replaced elsewhere."""
    mu = jax.tree.map(
        lambda p: (0.3 * jnp.cos(2 * p)).astype(mu_dtype or p.dtype), params
    )
    nu = jax.tree.map(lambda p: 0.05 + 0.02 * p * p, params)
    nu_max = jax.tree.map(lambda p, v: v + 100 * (p > 0).astype(v.dtype), params, nu)
    return mu, nu, nu_max


def _is_amsgrad(part):
    return isinstance(part, optax.ScaleByAmsgradState)


def _moments_of(state):
    """(mu, nu, nu_max) of the AMSGrad part of any optimizer's state."""
    (part,) = [p for p in jax.tree.leaves(state, is_leaf=_is_amsgrad) if _is_amsgrad(p)]
    return part.mu, part.nu, part.nu_max


def _with_moments(state, moments):
    """`state` with its AMSGrad part at `WARM_COUNT` with `moments`."""
    count = jnp.asarray(WARM_COUNT, jnp.int32)
    return jax.tree.map(
        lambda part: (
            optax.ScaleByAmsgradState(count, *moments) if _is_amsgrad(part) else part
        ),
        state,
        is_leaf=_is_amsgrad,
    )


def _tangents(tree, scale=1.0):
    """Fixed, nonzero tangents (or cotangents) for `tree`, constants under jit
    too: float0 for its integer leaves."""

    def tangent(index, x):
        if not jnp.issubdtype(x.dtype, jnp.inexact):
            return np.zeros(x.shape, jax.dtypes.float0)
        values = scale * np.cos(0.7 * np.arange(x.size) + index)
        return jnp.asarray(values.reshape(x.shape), x.dtype)

    leaves, treedef = jax.tree.flatten(tree)
    return treedef.unflatten([tangent(i, x) for i, x in enumerate(leaves)])


def _assert_nonzero(tree, context):
    """Each float leaf is nonzero somewhere: equal derivatives mean something."""
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if jnp.issubdtype(x.dtype, jnp.inexact):
            assert np.any(np.asarray(x) != 0), context + jax.tree_util.keystr(path)


def _assert_derivatives(actual, optax_derivatives, xla_derivatives, rtol=None):
    """`actual` within `rtol` (NORMWISE_RTOL by default) of optax's, and
    within a kernel's bound of the XLA path's."""
    _assert_nonzero(optax_derivatives, "optax's derivative is zero: ")
    tolerances.assert_trees_normwise_close(
        actual, optax_derivatives, "vs optax: ", rtol
    )
    tolerances.assert_trees_normwise_close(
        actual,
        xla_derivatives,
        "vs the XLA path: ",
        tolerances.KERNEL_VS_XLA_DERIVATIVE_RTOL,
    )


# --- Optimizers made from their (traced) hyperparameters. ---


def _as_step(make):
    """`make`'s optimizer with a `step`: `update`, then `apply_updates`."""

    def made(**hyperparams):
        opt = make(**hyperparams)

        def step(grads, state, params):
            updates, state = opt.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        return pallas_amsgrad.GradientTransformationWithStep(opt.init, opt.update, step)

    return made


def _recipe(implementation):
    def make(**hyperparams):
        hp = spec.Hyperparams(**hyperparams, **RECIPE_OPTIONS)
        if implementation is None:
            return composition.optimizer(hp)
        return optimizer(hp, implementation)

    return make


# The options of the kinds of `_maker` that are amsgrad with options.
KIND_OPTIONS = {
    "amsgrad": {},
    "mu-bfloat16": {"mu_dtype": jnp.bfloat16},
    # Not in optax: only ours.
    "stochastic": {"mu_dtype": jnp.bfloat16, "stochastic_rounding": True, "seed": 7},
}


@functools.cache
def _maker(kind: str, implementation=None):
    """A function from hyperparameters to an optimizer with `step`: ours on
    `implementation`, or where None optax's counterpart (`step` as update
    then apply). Kinds: those of `KIND_OPTIONS` (hyperparameters traced),
    "injected" (through `optax.inject_hyperparams`, by `update`) and
    "recipe" (clipping, masked decay, skips; optax's composition)."""
    ours = implementation is not None
    options = KIND_OPTIONS.get(kind, {})
    if kind == "recipe":
        return _as_step(_recipe(None)) if not ours else _recipe(implementation)
    if kind == "injected":
        if not ours:
            return _as_step(optax.inject_hyperparams(optax.amsgrad))
        injected = optax.inject_hyperparams(
            pallas_amsgrad.amsgrad, static_args=("implementation",)
        )
        return _as_step(functools.partial(injected, implementation=implementation))
    if not ours:
        return _as_step(functools.partial(optax.amsgrad, **options))
    return functools.partial(
        pallas_amsgrad.amsgrad, implementation=implementation, **options
    )


# --- Meta-gradients: a loss after steps, by jax.grad. ---


def _meta_loss(make_optimizer, steps):
    """The loss after `steps` steps, a function of (hyperparams, params,
    moments, gradient offsets)."""

    def loss(hyperparams, params, moments, offsets):
        opt = make_optimizer(**hyperparams)
        state = _with_moments(opt.init(params), moments)
        for step in range(steps):
            grads = _grads_at(params, step, offsets[step])
            params, state = opt.step(grads, state, params)
        mu, nu, nu_max = _moments_of(state)
        return sum(
            jnp.sum(jnp.cos(p.astype(jnp.float32)))
            + jnp.sum(m.astype(jnp.float32) ** 2)
            + jnp.sum(v.astype(jnp.float32))
            + jnp.sum(jnp.sqrt(v_max.astype(jnp.float32)))
            for p, m, v, v_max in zip(
                *map(jax.tree.leaves, (params, mu, nu, nu_max)), strict=True
            )
        )

    return loss


@functools.cache
def _meta_gradient(kind, implementation, hyperparams, steps=2):
    """d loss / d (hyperparams, params, moments, gradient offsets) of
    `_maker(kind, implementation)`; `hyperparams` as (name, value) pairs."""
    params = _params()
    offsets = [
        jax.tree.map(lambda p, s=s: 0.1 * (s + 1) * p, params) for s in range(steps)
    ]
    hyperparams = {k: jnp.float32(v) for k, v in hyperparams}
    loss = _meta_loss(_maker(kind, implementation), steps)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(
        hyperparams, params, _warm_moments(params), offsets
    )


def _assert_meta_gradient(kind, implementation, hyperparams):
    _assert_derivatives(
        *(
            _meta_gradient(kind, candidate, tuple(hyperparams.items()))
            for candidate in (implementation, None, XLA)
        )
    )


def test_meta_gradient_through_inject_hyperparams_matches_optax(implementation):
    """d loss / d (learning rate, b1, b2, eps, eps_root; params; mu, nu,
    nu_max; gradients) after two `update`s, the hyperparameters injected."""
    _assert_meta_gradient("injected", implementation, HYPERPARAMS)


def test_recipe_meta_gradient_matches_optax_composition(implementation):
    """Clipping, masked decay and the skip guard, by two `step`s: d loss / d
    (learning rate, weight decay, max_grad_norm; params; moments;
    gradients)."""
    _assert_meta_gradient("recipe", implementation, {"learning_rate": 0.1, **RECIPE})


# --- jax.jvp and jax.vjp of one step. ---


def _one_step(make_optimizer, fused):
    """(learning rate, grads, moments, params) -> (params or updates, new
    moments), one `step` or `update`."""

    def run(learning_rate, grads, moments, params):
        opt = make_optimizer(learning_rate=learning_rate)
        state = _with_moments(opt.init(params), moments)
        first, state = (opt.step if fused else opt.update)(grads, state, params)
        return first, _moments_of(state)

    return run


def _one_step_inputs(params, mu_dtype=None):
    grads = _grads_at(params, 0, jax.tree.map(jnp.zeros_like, params))
    return jnp.float32(0.1), grads, _warm_moments(params, mu_dtype), params


ONE_STEP_INPUTS = {
    "float32": lambda: _one_step_inputs(_params()),
    # A bfloat16 leaf beside a float32 one, mu in bfloat16: two dtype groups.
    "bfloat16": lambda: _one_step_inputs(
        _params(jnp.bfloat16, b_dtype=jnp.float32), jnp.bfloat16
    ),
    "nan-gradient": lambda: _with_nan_gradient(_one_step_inputs(_params())),
}


def _with_nan_gradient(inputs):
    learning_rate, grads, moments, params = inputs
    grads = {**grads, "b": grads["b"].at[3].set(jnp.nan)}
    return learning_rate, grads, moments, params


@functools.cache
def _jvp_and_vjp(kind, implementation, fused, inputs="float32"):
    """(values, tangents along `_tangents(inputs)`, the inputs' cotangents
    along `_tangents(values)`) of one step of `_maker(kind, implementation)`."""
    run = _one_step(_maker(kind, implementation), fused)
    inputs = ONE_STEP_INPUTS[inputs]()
    if not fused:  # `update` does not read the params.
        run = functools.partial(run, params=inputs[-1])
        inputs = inputs[:-1]

    def derivatives(inputs):
        values, tangents = jax.jvp(run, inputs, _tangents(inputs))
        _, pullback = jax.vjp(run, *inputs)
        return values, tangents, pullback(_tangents(values, scale=0.5))

    return jax.jit(derivatives)(inputs)


@pytest.mark.parametrize("fused", list(FUSED.values()), ids=list(FUSED))
def test_jvp_and_vjp_of_one_step_match_optax(implementation, fused):
    """Forward and reverse mode through `update` and `step`, with respect to
    the learning rate, gradients, moments and (for `step`) params."""
    actual, expected, xla = (
        _jvp_and_vjp("amsgrad", candidate, fused)
        for candidate in (implementation, None, XLA)
    )
    tolerances.assert_trees_normwise_close(actual[0], expected[0], "values: ")
    _assert_derivatives(actual[1], expected[1], xla[1])
    _assert_derivatives(actual[2], expected[2], xla[2])


def test_bfloat16_leaf_and_mu_match_optax(implementation):
    """`step` on a bfloat16 leaf beside a float32 one, mu in bfloat16. optax
    computes the bfloat16 leaf in bfloat16: its derivatives agree as
    bfloat16 values do."""
    actual, expected, xla = (
        _jvp_and_vjp("mu-bfloat16", candidate, True, "bfloat16")
        for candidate in (implementation, None, XLA)
    )
    bfloat16_rtol = dict.fromkeys(
        tolerances.NORMWISE_RTOL, tolerances.NORMWISE_RTOL["bfloat16"]
    )
    _assert_derivatives(actual[1], expected[1], xla[1], bfloat16_rtol)
    _assert_derivatives(actual[2], expected[2], xla[2], bfloat16_rtol)


def test_stochastic_rounding_differentiates_straight_through(implementation):
    """16-bit stores rounded stochastically differentiate as rounding to
    nearest does (a plain cast's derivative): one `step`'s tangents and
    cotangents are those of the XLA path with stochastic rounding and
    without it, bit for bit, while the values are the XLA path's stochastic
    ones and not all rounded to nearest."""
    values, tangents, cotangents = _jvp_and_vjp(
        "stochastic", implementation, True, "bfloat16"
    )
    stochastic = _jvp_and_vjp("stochastic", XLA, True, "bfloat16")
    nearest = _jvp_and_vjp("mu-bfloat16", XLA, True, "bfloat16")
    tolerances.assert_trees_equal(values, stochastic[0], "values: ")
    assert not np.array_equal(values[0]["w"], nearest[0][0]["w"])
    _assert_nonzero(tangents, "zero tangent: ")
    for derivatives in (stochastic, nearest):
        tolerances.assert_trees_equal(tangents, derivatives[1], "tangents: ")
        tolerances.assert_trees_equal(cotangents, derivatives[2], "cotangents: ")


def test_a_skipped_step_passes_derivatives_through(implementation):
    """A `step` the recipe's guard skips (a NaN gradient) returns its inputs,
    so its derivatives are the identity: the params' and moments' tangents
    come out as they went in, their cotangents go back unchanged, and the
    learning rate's and gradients' are zero (not NaN), as optax's are. The
    kernel's are the XLA path's."""
    actual, expected, xla = (
        _jvp_and_vjp("recipe", candidate, True, "nan-gradient")
        for candidate in (implementation, None, XLA)
    )
    inputs = ONE_STEP_INPUTS["nan-gradient"]()
    input_tangents = _tangents(inputs)
    tolerances.assert_trees_equal(actual[0], (inputs[3], inputs[2]), "values: ")
    tolerances.assert_trees_equal(
        actual[1], (input_tangents[3], input_tangents[2]), "tangents: "
    )
    learning_rate, grads, moments, params = actual[2]
    tolerances.assert_trees_equal(
        (params, moments), _tangents(actual[0], scale=0.5), "cotangents: "
    )
    tolerances.assert_trees_equal(
        (learning_rate, grads), jax.tree.map(jnp.zeros_like, (learning_rate, grads))
    )
    tolerances.assert_trees_normwise_close(actual, expected, "vs optax: ")
    tolerances.assert_trees_equal(actual, xla, "vs the XLA path: ")


@pytest.mark.slow
@pytest.mark.parametrize(
    "interpreted",
    [
        # One core, no race detector: races are tests/test_tpu_interpret.py's.
        lambda: tpu_interpreted(16, detect_races=False, num_cores_or_threads=1),
        lambda: gpu_interpreted(16),
    ],
    ids=["tpu-interpret", "gpu-interpret"],
)
def test_device_kernels_differentiate_as_optax(interpreted):
    """The TPU and GPU kernels in their interpreters: jvp and vjp of one
    `step`, as the XLA path's and optax's."""
    actual = _jvp_and_vjp("amsgrad", interpreted(), True)
    expected = _jvp_and_vjp("amsgrad", None, True)
    xla = _jvp_and_vjp("amsgrad", XLA, True)
    tolerances.assert_trees_normwise_close(actual[0], expected[0], "values: ")
    _assert_derivatives(actual[1], expected[1], xla[1])
    _assert_derivatives(actual[2], expected[2], xla[2])


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_gradient_through_step_exports_with_the_kernel(platform):
    """jax.grad of a loss after a `step` lowers for the devices (Mosaic's own
    lowering, from this CPU machine): the kernel runs the forward pass, one
    custom call per leaf and step here, and plain XLA ops the derivatives."""

    def loss(learning_rate, params):
        opt = pallas_amsgrad.amsgrad(learning_rate, implementation="pallas")
        params, _ = opt.step(jax.tree.map(jnp.sin, params), opt.init(params), params)
        return jnp.sum(jnp.cos(params))

    params = jax.ShapeDtypeStruct((16, 128), jnp.float32)
    module = exporting.export(
        jax.jit(jax.grad(loss, argnums=(0, 1))),
        platform,
        jax.ShapeDtypeStruct((), jnp.float32),
        params,
    )
    custom_call = {"tpu": "tpu_custom_call", "cuda": "mosaic_gpu_v2"}[platform]
    assert len(exporting.launches(module, custom_call)) == 1
