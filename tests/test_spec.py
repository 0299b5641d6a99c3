"""The spec on its own: hand-worked numbers, then against the pinned optax."""

from __future__ import annotations

import dataclasses
import typing

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


def optax_state_of(spec_state: spec.AmsgradState) -> optax.ScaleByAmsgradState:
    return optax.ScaleByAmsgradState(*spec_state)


def run_optax(hp, params, grads_per_step):
    """optax.amsgrad over the steps: [(updates, ScaleByAmsgradState, params)]."""
    opt = optax.amsgrad(**composition.amsgrad_kwargs(hp))
    state = opt.init(params)
    out = []
    optax_update = jax.jit(opt.update)
    apply_updates = jax.jit(optax.apply_updates)
    for grads in grads_per_step:
        updates, state = optax_update(grads, state, params)
        params = apply_updates(params, updates)
        out.append((updates, state[0], params))
    return out


def run_spec(hp, params, grads_per_step, fused=False):
    """The spec over the same steps, with apply (or the fused step)."""
    state = spec.init(params, hp.mu_dtype)
    out = []
    spec_update = jax.jit(spec.update, static_argnums=2)
    spec_step = jax.jit(spec.step, static_argnums=3)
    spec_apply = jax.jit(spec.apply)
    for grads in grads_per_step:
        if fused:
            new_params, new_state = spec_step(grads, state, params, hp)
            updates = spec_update(grads, state, hp)[0]
        else:
            updates, new_state = spec_update(grads, state, hp)
            new_params = spec_apply(params, updates)
        state, params = new_state, new_params
        out.append((updates, optax_state_of(state), params))
    return out


class TestHandWorked:
    """Two steps of a scalar, worked by hand in float64 (see the comments)."""

    # b1=0.9, b2=0.999, lr=0.1, eps=1e-8, g1=0.5, g2=-1.0, p0=1.
    # Step 1: mu=0.1*0.5=0.05, nu=0.001*0.25=0.00025, bc1=0.1, bc2=0.001,
    #   nu_max=0.25, u=-0.1*(0.05/0.1)/(sqrt(0.25)+1e-8)=-0.0999999980000001.
    # Step 2: mu=-0.1+0.9*0.05=-0.055, nu=0.001+0.999*0.00025=0.00124975,
    #   bc1=0.19, bc2=0.001999, nu_eff=0.6251875937969069=nu_max,
    #   u=-0.1*(-0.055/0.19)/(sqrt(0.6251875937969069)+1e-8)=0.0366103522405654.
    EXPECTED: typing.ClassVar = [
        dict(
            mu=0.05,
            nu=0.00025,
            nu_max=0.25,
            update=-0.0999999980000001,
            param=0.9000000019999999,
        ),
        dict(
            mu=-0.055,
            nu=0.00124975,
            nu_max=0.6251875937969069,
            update=0.0366103522405654,
            param=0.9366103542405653,
        ),
    ]

    # In float32, 1 - b2**t loses the digits of b2 = 0.999 that float32 cannot
    # hold: bc2 = 0.00099998713, 1.3e-5 off 0.001, as in optax.
    @pytest.mark.parametrize("dtype,rtol", [("float32", 3e-5), ("float64", 1e-14)])
    def test_two_steps(self, dtype, rtol):
        with jax.enable_x64(dtype == "float64"):
            hp = spec.Hyperparams(learning_rate=0.1)
            params = jnp.asarray(1.0, dtype)
            state = spec.init(params)
            for grad, expected in zip([0.5, -1.0], self.EXPECTED, strict=True):
                updates, new_state = spec.update(jnp.asarray(grad, dtype), state, hp)
                params, step_state = spec.step(
                    jnp.asarray(grad, dtype), state, params, hp
                )
                state = new_state
                assert step_state.count == state.count
                for name, value in [
                    ("mu", state.mu),
                    ("nu", state.nu),
                    ("nu_max", state.nu_max),
                    ("update", updates),
                    ("param", params),
                ]:
                    assert value.dtype == jnp.dtype(dtype), name
                    np.testing.assert_allclose(
                        float(value), expected[name], rtol=rtol, err_msg=name
                    )
            assert state.count.dtype == jnp.int32 and int(state.count) == 2

    @pytest.mark.parametrize("x64", [False, True], ids=["x32", "x64"])
    def test_count_saturates_at_int32_max(self, x64):
        """Without wrapping, and staying int32 even where Python ints are int64."""
        with jax.enable_x64(x64):
            top = jnp.iinfo(jnp.int32).max
            for before in (top - 1, top):
                count = spec.increment_count(jnp.asarray(before, jnp.int32))
                assert count.dtype == jnp.int32 and int(count) == top
            state = spec.init(jnp.ones(3))._replace(count=jnp.asarray(top, jnp.int32))
            _, state = spec.update(jnp.ones(3), state, spec.Hyperparams(0.1))
            assert state.count.dtype == jnp.int32 and int(state.count) == top


@pytest.mark.parametrize(
    "mu_dtype", strategies.MU_DTYPES, ids=["mu=param", "mu=bf16", "mu=f16", "mu=f32"]
)
@pytest.mark.parametrize(
    "dtype", strategies.PARAM_DTYPES, ids=lambda d: jnp.dtype(d).name
)
def test_init_equals_optax_init(dtype, mu_dtype):
    """Structure, shapes, dtypes and zeros of the state, before any step."""
    params = {
        "w": jnp.ones((3, 5), dtype),
        "b": [jnp.ones(7, dtype), jnp.ones((), dtype)],
        "empty": jnp.ones((0, 2), dtype),
    }
    expected = optax.scale_by_amsgrad(mu_dtype=mu_dtype).init(params)
    tolerances.assert_trees_equal(optax_state_of(spec.init(params, mu_dtype)), expected)


@pytest.mark.parametrize("learning_rate", ["float", "array", "schedule"])
@pytest.mark.parametrize(
    "mu_dtype", strategies.MU_DTYPES, ids=["mu=param", "mu=bf16", "mu=f16", "mu=f32"]
)
@pytest.mark.parametrize(
    "dtype", strategies.PARAM_DTYPES, ids=lambda d: jnp.dtype(d).name
)
def test_output_dtypes_equal_optax(dtype, mu_dtype, learning_rate):
    """Updates, state and params of update, apply and step, abstractly. optax
    casts a scheduled learning rate to the update's dtype; a constant one
    promotes with it (a float32 array lifts a bfloat16 update to float32)."""
    lr = {
        "float": 0.1,
        "array": jnp.asarray(0.1, jnp.float32),
        "schedule": optax.linear_schedule(0.1, 0.01, 10),  # float32 arrays.
    }[learning_rate]
    hp = spec.Hyperparams(learning_rate=lr, mu_dtype=mu_dtype)
    params = {"w": jax.ShapeDtypeStruct((3, 5), dtype)}
    opt = optax.amsgrad(**composition.amsgrad_kwargs(hp))

    def optax_step(grads, params):
        updates, state = opt.update(grads, opt.init(params), params)
        return updates, state[0], optax.apply_updates(params, updates)

    def spec_step(grads, params):
        updates, state = spec.update(grads, spec.init(params, mu_dtype), hp)
        fused_params, fused_state = spec.step(
            grads, spec.init(params, mu_dtype), params, hp
        )
        assert jax.tree.map(jnp.dtype, fused_state) == jax.tree.map(jnp.dtype, state)
        return updates, optax_state_of(state), fused_params

    expected = jax.eval_shape(optax_step, params, params)
    actual = jax.eval_shape(spec_step, params, params)
    assert jax.tree.map(lambda x: x.dtype, actual) == jax.tree.map(
        lambda x: x.dtype, expected
    )


@given(data=st.data())
@pytest.mark.parametrize(
    "mu_dtype", [None, jnp.float32], ids=["mu=param", "mu=float32"]
)
def test_float32_equals_optax_bitwise(mu_dtype, data):
    """Updates, state and applied params equal optax's bit for bit."""
    params, grads = data.draw(strategies.trajectories(jnp.float32))
    hp = data.draw(strategies.hyperparams(mu_dtype))
    note(f"{hp=}")
    expected = run_optax(hp, params, grads)
    for fused in (False, True):
        actual = run_spec(hp, params, grads, fused=fused)
        for step, (a, e) in enumerate(zip(actual, expected, strict=True)):
            tolerances.assert_trees_equal(a, e, f"step {step} fused={fused}: ")


def _rounding_dtype(dtype, mu_dtype) -> jnp.dtype:
    """The narrowest dtype optax rounds an intermediate to: the leaf's, or
    mu_dtype's where optax keeps b1 * mu in it before the sum."""
    candidates = [jnp.dtype(dtype)] + ([jnp.dtype(mu_dtype)] if mu_dtype else [])
    return min(candidates, key=lambda d: jnp.finfo(d).nmant)


# Every (param dtype, mu_dtype) where optax rounds below float32; float32 with
# mu=param or float32 is bitwise (test_float32_equals_optax_bitwise).
ROUNDING_CONFIGS = [
    (dtype, mu_dtype)
    for dtype in strategies.PARAM_DTYPES
    for mu_dtype in strategies.MU_DTYPES
    if not (dtype == jnp.float32 and mu_dtype in (None, jnp.float32))
]


@given(data=st.data())
@pytest.mark.parametrize(
    "dtype, mu_dtype",
    ROUNDING_CONFIGS,
    ids=[
        f"{jnp.dtype(d).name}-mu={m and jnp.dtype(m).name}" for d, m in ROUNDING_CONFIGS
    ],
)
def test_rounded_intermediates_within_ulps_of_optax(dtype, mu_dtype, data):
    """One step from the same state: dtypes exact, values within the ULP bound.

    Wherever optax rounds an intermediate below float32 (16-bit leaves, or
    b1 * mu kept in a 16-bit mu_dtype) the spec rounds once; the difference is
    counted in ULPs of that narrowest dtype at the summands' magnitude.
    Excluded, in float16 only: values where optax's intermediates leave
    float16's range (see test_spec_avoids_optax_float16_nan) or are subnormal
    there, having lost their relative precision where the spec's have not.
    """
    params, grads = data.draw(strategies.trajectories(dtype))
    hp = data.draw(strategies.hyperparams(mu_dtype))
    note(f"{hp=}")
    opt = optax.amsgrad(**composition.amsgrad_kwargs(hp))
    ulp_dtype = _rounding_dtype(dtype, mu_dtype)
    float16_min = float(jnp.finfo(jnp.float16).smallest_normal)
    state = spec.init(params, mu_dtype)
    for step, g in enumerate(grads):
        spec_updates, spec_state = spec.update(g, state, hp)
        optax_updates, (optax_state, _) = opt.update(
            g,
            (
                optax_state_of(state),
                opt.init(params)[1]._replace(
                    **({"count": state.count} if callable(hp.learning_rate) else {})
                ),
            ),
            params,
        )
        # Scale: the same step on |g| and |mu|, where no term can cancel.
        magnitude_updates, magnitude_state = spec.update(
            jax.tree.map(jnp.abs, g),
            state._replace(mu=jax.tree.map(jnp.abs, state.mu)),
            hp,
        )
        for name, a, e, scale in [
            ("updates", spec_updates, optax_updates, magnitude_updates),
            ("mu", spec_state.mu, optax_state.mu, magnitude_state.mu),
            ("nu", spec_state.nu, optax_state.nu, magnitude_state.nu),
            ("nu_max", spec_state.nu_max, optax_state.nu_max, magnitude_state.nu_max),
        ]:
            for x, y, s, mu_scale, nu_scale in zip(
                jax.tree.leaves(a),
                jax.tree.leaves(e),
                jax.tree.leaves(scale),
                jax.tree.leaves(magnitude_state.mu),
                jax.tree.leaves(magnitude_state.nu),
                strict=True,
            ):
                assert x.dtype == y.dtype, (name, x.dtype, y.dtype)
                if x.size == 0:
                    continue
                error = tolerances.scaled_ulp_error(x, y, s, dtype=ulp_dtype)
                out_of_float16_range = np.zeros(x.shape, bool)
                if jnp.dtype(dtype) == jnp.float16:
                    # optax's (1-b2) g**2 subnormal, or its eps=1e-8 rounded
                    # to 0 giving 0/0 or x/0.
                    out_of_float16_range |= (
                        np.asarray(nu_scale, np.float64) < float16_min
                    )
                    out_of_float16_range |= ~np.isfinite(
                        np.asarray(y, np.float64)
                    ) & np.isfinite(np.asarray(x, np.float64))
                if mu_dtype is not None and jnp.dtype(mu_dtype) == jnp.float16:
                    # optax's b1 * mu rounded to a float16 subnormal.
                    out_of_float16_range |= (
                        np.asarray(mu_scale, np.float64) < float16_min
                    )
                error = np.where(out_of_float16_range, 0, error)
                bound = tolerances.SPEC_VS_OPTAX_ULPS[ulp_dtype.name]
                assert error.max() <= bound, (
                    f"step {step} {name}: {error.max()} {ulp_dtype.name} ULPs"
                )
        state = spec_state


@pytest.mark.parametrize("x64", [False, True], ids=["x32", "x64"])
def test_compute_dtype_is_the_promoted_dtype_at_least_float32(x64):
    """The precision rule's dtype, also where jnp's default float is float64."""
    with jax.enable_x64(x64):
        f32 = jnp.dtype(jnp.float32)
        assert spec.compute_dtype(jnp.bfloat16) == f32
        assert spec.compute_dtype(jnp.float16, jnp.bfloat16) == f32
        assert spec.compute_dtype(jnp.float32, jnp.bfloat16) == f32
        assert spec.compute_dtype(jnp.float32) == f32
        if x64:
            assert spec.compute_dtype(jnp.float64, jnp.float32) == jnp.float64


@pytest.mark.parametrize("weight_decay", [None, 0.3], ids=["plain", "decayed"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16_bit_leaves_are_computed_in_float32_and_rounded_once(dtype, weight_decay):
    """The precision rule, directly: a 16-bit leaf's outputs are the outputs
    of the same values as float32 leaves, each rounded once to 16 bits (the
    decay's term too: the param is read in float32)."""
    hp = spec.Hyperparams(learning_rate=0.01, eps=1e-3, weight_decay=weight_decay)
    params = jnp.linspace(-3, 3, 41).astype(dtype)
    grads = [
        jnp.cos(7 * params.astype(jnp.float32) + s).astype(dtype) for s in range(2)
    ]
    narrow_state = spec.init(params)
    for g in grads:
        wide_state = jax.tree.map(lambda x: x.astype(jnp.float32), narrow_state)
        wide_state = wide_state._replace(count=narrow_state.count)
        wide = spec.step(
            g.astype(jnp.float32), wide_state, params.astype(jnp.float32), hp
        )
        narrow = spec.step(g, narrow_state, params, hp)
        wide_update = spec.update(
            g.astype(jnp.float32), wide_state, hp, params.astype(jnp.float32)
        )[0]
        narrow_update = spec.update(g, narrow_state, hp, params)[0]
        rounded = jax.tree.map(
            lambda w, n: w.astype(n.dtype) if w.dtype != jnp.int32 else w,
            (wide, wide_update),
            (narrow, narrow_update),
        )
        tolerances.assert_trees_equal((narrow, narrow_update), rounded)
        narrow_state = narrow[1]


@pytest.mark.parametrize("nu_dtype", ["bfloat16", "float16"])
def test_nu_dtype_narrows_only_the_storage_of_nu_and_nu_max(nu_dtype):
    """From the same values, a step with `nu_dtype` gives the updates, params
    and mu of the step without it, and its nu and nu_max rounded once to
    `nu_dtype`; the next step reads the rounded values."""
    hp = spec.Hyperparams(learning_rate=0.01, eps=1e-6)
    narrow_hp = dataclasses.replace(hp, nu_dtype=jnp.dtype(nu_dtype))
    params = jnp.linspace(-3, 3, 41, dtype=jnp.float32)
    state = spec.init(params, nu_dtype=nu_dtype)
    assert state.nu.dtype == state.nu_max.dtype == jnp.dtype(nu_dtype)
    for s in range(3):
        g = jnp.cos(7 * params + s) * 10.0**-s
        wide_state = state._replace(
            nu=state.nu.astype(jnp.float32), nu_max=state.nu_max.astype(jnp.float32)
        )
        wide_params, wide = spec.step(g, wide_state, params, hp)
        wide_updates, _ = spec.update(g, wide_state, hp)
        new_params, narrow = spec.step(g, state, params, narrow_hp)
        updates, update_state = spec.update(g, state, narrow_hp)
        tolerances.assert_trees_equal(update_state, narrow)
        tolerances.assert_trees_equal(
            (new_params, updates, narrow),
            (
                wide_params,
                wide_updates,
                wide._replace(
                    nu=wide.nu.astype(nu_dtype), nu_max=wide.nu_max.astype(nu_dtype)
                ),
            ),
        )
        params, state = new_params, narrow


def test_spec_avoids_optax_float16_nan():
    """A zero gradient in float16: optax computes 0/0 (eps=1e-8 rounds to 0)."""
    params = jnp.ones(4, jnp.float16)
    hp = spec.Hyperparams(learning_rate=0.1)
    grads = jnp.zeros(4, jnp.float16)
    optax_updates, _ = optax.amsgrad(0.1).update(grads, optax.amsgrad(0.1).init(params))
    spec_updates, _ = spec.update(grads, spec.init(params), hp)
    assert np.isnan(np.asarray(optax_updates, np.float32)).all()
    np.testing.assert_array_equal(np.asarray(spec_updates, np.float32), 0)
    assert spec_updates.dtype == jnp.float16


def widen(tree):
    """Floating leaves to float64 (the step count stays int32); under x64."""
    return jax.tree.map(
        lambda x: (
            jnp.asarray(x, jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x
        ),
        tree,
    )


@given(data=st.data())
@pytest.mark.parametrize(
    "dtype", [jnp.bfloat16, jnp.float16], ids=["bfloat16", "float16"]
)
def test_spec_at_least_as_accurate_as_optax(dtype, data):
    """Against a float64 ground truth over a tree, the spec's max and mean
    errors (in ULPs of the output dtype) are no larger than optax's."""
    params, grads = data.draw(strategies.trajectories(dtype))
    hp = data.draw(strategies.hyperparams(None, learning_rates=("constant",)))
    opt = optax.amsgrad(**composition.amsgrad_kwargs(hp))
    state = spec.init(params)
    spec_errors, optax_errors = [], []
    for g in grads:
        spec_updates, spec_state = spec.update(g, state, hp)
        optax_updates, (optax_state, _) = opt.update(
            g, (optax_state_of(state), optax.EmptyState())
        )
        with jax.enable_x64(True):
            truth_updates, truth_state = spec.update(widen(g), widen(state), hp)
            truth = [
                np.asarray(x) for x in jax.tree.leaves((truth_updates, truth_state[1:]))
            ]
        for errors, result in [
            (spec_errors, (spec_updates, spec_state[1:])),
            (optax_errors, (optax_updates, tuple(optax_state)[1:])),
        ]:
            for x, t in zip(jax.tree.leaves(result), truth, strict=True):
                error = np.abs(np.asarray(x, np.float64) - t) / tolerances.ulp_at(
                    t, x.dtype
                )
                errors.append(error.ravel())
        state = spec_state
    spec_all = np.nan_to_num(np.concatenate(spec_errors), nan=np.inf)
    optax_all = np.nan_to_num(np.concatenate(optax_errors), nan=np.inf)
    note(
        f"spec max {spec_all.max()} mean {spec_all.mean()}; optax max {optax_all.max()} mean {optax_all.mean()}"
    )
    assert spec_all.max() <= optax_all.max()
    assert spec_all.mean() <= optax_all.mean()


def test_complex_leaf_matches_optax():
    """|g|^2 for complex gradients, as optax (the spec mirrors it there too)."""
    params = {"c": jnp.array([1 + 2j, -0.5j, 3.0], jnp.complex64), "r": jnp.ones(2)}
    grads = {
        "c": jnp.array([0.5 - 1j, 2 + 0j, -1j], jnp.complex64),
        "r": jnp.full(2, 0.25),
    }
    hp = spec.Hyperparams(learning_rate=0.01)
    expected = run_optax(hp, params, [grads, grads])
    actual = run_spec(hp, params, [grads, grads])
    for a, e in zip(actual, expected, strict=True):
        tolerances.assert_trees_ulp_close(a, e, {"complex64": 0, "float32": 0})
