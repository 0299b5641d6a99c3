"""The optax composition that a `spec.Hyperparams` stands for, and its state.

`pallas_amsgrad.amsgrad(**kwargs)` and the spec both mirror it; `verify` and
the tests run it as optax's own answer, and move states between the spec's
form and the composition's (which is also `pallas_amsgrad.amsgrad`'s).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

import amsgrad_spec as spec
from pallas_amsgrad import _quantization


def amsgrad_kwargs(hp: spec.Hyperparams) -> dict:
    """The keyword arguments of optax.amsgrad / pallas_amsgrad.amsgrad for hp,
    without the recipe's options."""
    return {
        "learning_rate": hp.learning_rate,
        "b1": hp.b1,
        "b2": hp.b2,
        "eps": hp.eps,
        "eps_root": hp.eps_root,
        "mu_dtype": hp.mu_dtype,
        "bias_correction_mu": hp.bias_correction_mu,
        "bias_correction_nu": hp.bias_correction_nu,
    }


def option_kwargs(hp: spec.Hyperparams) -> dict:
    """The options beyond optax.amsgrad's that `hp` sets (nu_dtype,
    stochastic rounding and the recipe's), as pallas_amsgrad.amsgrad takes
    them."""
    options = {}
    if hp.nu_dtype is not None:
        options["nu_dtype"] = hp.nu_dtype
    if hp.stochastic_rounding:
        options["stochastic_rounding"] = True
        options["seed"] = hp.seed
    if quantizes(hp) and hp.quantization_block != spec.QUANTIZATION_BLOCK:
        options["quantization_block"] = hp.quantization_block
    return options | recipe_kwargs(hp)


def quantizes(hp: spec.Hyperparams) -> bool:
    """Whether `hp` asks for 8-bit state (which optax does not have)."""
    return any(
        d is not None and jnp.dtype(d) in _quantization.QUANTIZED_DTYPES
        for d in (hp.mu_dtype, hp.nu_dtype)
    )


def recipe_kwargs(hp: spec.Hyperparams) -> dict:
    """The recipe's options that `hp` sets, as `amsgrad` takes them."""
    options = {}
    if hp.decays:
        options["weight_decay"] = hp.weight_decay
        if hp.mask is not None:
            options["mask"] = hp.mask
    if hp.max_grad_norm is not None:
        options["max_grad_norm"] = hp.max_grad_norm
    if hp.max_consecutive_errors is not None:
        options["max_consecutive_errors"] = hp.max_consecutive_errors
    return options


def pallas_kwargs(hp: spec.Hyperparams) -> dict:
    """Every keyword argument of pallas_amsgrad.amsgrad for hp."""
    return amsgrad_kwargs(hp) | option_kwargs(hp)


def optimizer(hp: spec.Hyperparams) -> optax.GradientTransformation:
    """optax.amsgrad, or the composition of the recipe's options around it.

    optax has no `nu_dtype`: for such an `hp` there is no optax optimizer
    (`init` gives the state it would have)."""
    if hp.nu_dtype is not None or hp.stochastic_rounding or quantizes(hp):
        raise ValueError(
            f"optax has no nu_dtype, stochastic rounding or 8-bit state "
            f"(hp.mu_dtype={hp.mu_dtype}, hp.nu_dtype={hp.nu_dtype}, "
            f"hp.stochastic_rounding={hp.stochastic_rounding}): no optax "
            "optimizer stands for this hp"
        )
    return amsgrad(**amsgrad_kwargs(hp), **recipe_kwargs(hp))


def amsgrad(
    learning_rate,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    eps_root=0.0,
    mu_dtype=None,
    bias_correction_mu=True,
    bias_correction_nu=True,
    *,
    weight_decay=None,
    mask=None,
    max_grad_norm=None,
    max_consecutive_errors=None,
) -> optax.GradientTransformation:
    """The optax composition `pallas_amsgrad.amsgrad` stands for, with its
    arguments and defaults: `optax.inject_hyperparams` of both gives the
    same state."""
    inner = optax.chain(
        *(
            [optax.clip_by_global_norm(max_grad_norm)]
            if max_grad_norm is not None
            else []
        ),
        optax.scale_by_amsgrad(
            b1, b2, eps, eps_root, mu_dtype, bias_correction_mu, bias_correction_nu
        ),
        *(
            [optax.add_decayed_weights(weight_decay, mask)]
            if weight_decay is not None
            else []
        ),
        optax.scale_by_learning_rate(learning_rate),
    )
    if max_consecutive_errors is None:
        return inner
    return optax.apply_if_finite(inner, max_consecutive_errors)


def init(params, hp: spec.Hyperparams):
    """The composition's initial state, with nu and nu_max in `hp.nu_dtype`
    where set: what optax would carry if it had nu_dtype, and what
    pallas_amsgrad.amsgrad(**pallas_kwargs(hp)).init must return."""
    if quantizes(hp):
        return optax_state_of(spec.init_state(params, hp), hp, params)
    state = optimizer(_with_optax_dtypes(hp)).init(params)
    if hp.nu_dtype is None:
        return state
    spec_state = spec_state_of(state, hp)
    inner = _inner(spec_state, hp)
    narrowed = inner._replace(
        nu=jax.tree.map(lambda x: x.astype(hp.nu_dtype), inner.nu),
        nu_max=jax.tree.map(lambda x: x.astype(hp.nu_dtype), inner.nu_max),
    )
    if hp.max_consecutive_errors is not None:
        narrowed = spec_state._replace(inner_state=narrowed)
    return optax_state_of(narrowed, hp, params)


def _with_optax_dtypes(hp: spec.Hyperparams) -> spec.Hyperparams:
    """`hp` less what optax lacks (nu_dtype, an 8-bit mu_dtype; stochastic
    rounding, which changes no state's structure or dtype)."""
    mu_dtype = None if quantizes(hp) else hp.mu_dtype
    return dataclasses.replace(
        hp, mu_dtype=mu_dtype, nu_dtype=None, stochastic_rounding=False
    )


def _moments_as(state, moment_of):
    """`state` (an AMSGrad state) with each quantized moment converted."""
    is_moment = lambda x: isinstance(  # noqa: E731
        x, spec.QuantizedMoment | _quantization.QuantizedArray
    )
    return state._replace(
        **{
            name: jax.tree.map(
                lambda x: moment_of(x) if is_moment(x) else x,
                getattr(state, name),
                is_leaf=is_moment,
            )
            for name in ("mu", "nu", "nu_max")
        }
    )


def _inner(state, hp):
    return state if hp.max_consecutive_errors is None else state.inner_state


def amsgrad_state(state, hp: spec.Hyperparams) -> optax.ScaleByAmsgradState:
    """The AMSGrad part of the composition's state."""
    return _inner(state, hp)[1 if hp.max_grad_norm is not None else 0]


def spec_state_of(state, hp: spec.Hyperparams):
    """The spec's state inside the composition's (or optax.amsgrad's)."""
    inner = spec.AmsgradState(*amsgrad_state(state, hp))
    inner = _moments_as(inner, lambda q: spec.QuantizedMoment(q.codes, q.scales))
    if hp.max_consecutive_errors is None:
        return inner
    return spec.FiniteGuardState(
        state.notfinite_count, state.last_finite, state.total_notfinite, inner
    )


def optax_state_of(spec_state, hp: spec.Hyperparams, params):
    """The composition's state holding the spec's: every schedule's count is
    the AMSGrad count (they advance together, and a skipped step stops all)."""
    inner = _moments_as(
        _inner(spec_state, hp),
        lambda q: _quantization.QuantizedArray(
            q.codes, q.scales, hp.quantization_block
        ),
    )

    def filled(part):
        if isinstance(part, optax.ScaleByAmsgradState):
            return optax.ScaleByAmsgradState(*inner)
        if isinstance(part, optax.MaskedState):
            return optax.MaskedState(inner_state=filled(part.inner_state))
        if "count" in getattr(part, "_fields", ()):  # A schedule's state.
            return part._replace(count=inner.count)
        return part

    template = optimizer(_with_optax_dtypes(hp)).init(params)
    states = tuple(filled(part) for part in _inner(template, hp))
    if hp.max_consecutive_errors is None:
        return states
    return template._replace(
        notfinite_count=spec_state.notfinite_count,
        last_finite=spec_state.last_finite,
        total_notfinite=spec_state.total_notfinite,
        inner_state=states,
    )
