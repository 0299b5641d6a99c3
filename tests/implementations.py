"""The implementations the suite runs, as objects handed to the optimizer.

`IMPLEMENTATIONS` names what conftest.py's `implementation` fixture runs every
implementation-level check with; the accelerator-interpreter lanes build their
own `Pallas` objects (`tpu_interpreted`, `gpu_interpreted`). Nothing is
patched: the object carries its configuration.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
import tolerances
from jax._src.pallas.mosaic.interpret import interpret_pallas_call
from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
from jax.experimental.pallas import tpu as pltpu

import amsgrad_spec as spec
import pallas_amsgrad
from pallas_amsgrad import _implementations
from pallas_amsgrad.tools import composition

IMPLEMENTATIONS = ("pallas", "xla")


@functools.cache
def named(name: str):
    """The object the suite runs for `name`. "pallas" is the kernel lowered
    for this host's platform alone: on CPU Pallas' generic interpreter (the
    TPU and GPU kernels, which it would also trace, are traced and run in
    their own lanes: test_tpu_interpret, test_gpu_interpret, test_lowering),
    on a GPU or TPU host the compiled kernel, which the accelerator lane
    judges. Resolved at first use, so that importing the tests starts no
    backend."""
    if name == "pallas":
        platform = _implementations.Target.of(jax.devices()[0]).platform
        return pallas_amsgrad.Pallas(platforms=(platform,))
    return pallas_amsgrad.IMPLEMENTATIONS[name]


def tpu_interpreted(block_rows: int, **overrides) -> pallas_amsgrad.Pallas:
    """The TPU kernel in the strictest TPU interpreter: two cores in a random
    order, races, NaN-filled uninitialized memory and bad reads fail."""
    settings = dict(
        detect_races=True,
        uninitialized_memory="nan",
        out_of_bounds_reads="raise",
        num_cores_or_threads=2,
    )
    return pallas_amsgrad.Pallas(
        block_sizes=pallas_amsgrad.BlockSizes(block_rows),
        interpret_params=pltpu.InterpretParams(**(settings | overrides)),
    )


@contextlib.contextmanager
def race_checked():
    """Fails if the TPU interpreter detected a data race in the kernels run."""
    pltpu.reset_tpu_interpret_mode_state()
    yield
    races = interpret_pallas_call.races
    assert races is not None, "no kernel ran in the TPU interpreter"
    assert not races.races_found, "the TPU interpreter detected a data race"


def gpu_interpreted(block_rows: int) -> pallas_amsgrad.Pallas:
    """The GPU kernel in the Mosaic GPU interpreter, races detected."""
    return pallas_amsgrad.Pallas(
        block_sizes=pallas_amsgrad.BlockSizes(block_rows),
        interpret_params=InterpretGPUParams(
            detect_races=True, uninitialized_memory="zero"
        ),
    )


def recipe_case(columns: int):
    """(params, grads, hp) of the interpreters' recipe check: clipping that
    bites, decay of `w` only, and a NaN in `b` at the second of three steps
    (skipped). `columns` shapes `w` as (40, columns)."""
    hp = spec.Hyperparams(
        0.01,
        weight_decay=0.1,
        mask={"w": True, "b": False},
        max_grad_norm=0.5,
        max_consecutive_errors=2,
    )
    params = {
        "w": jnp.linspace(-1, 1, 40 * columns).reshape(40, columns),
        "b": jnp.linspace(0, 1, 200),
    }
    grads = [
        jax.tree.map(lambda p, s=s: jnp.sin(p * (2 + s)), params) for s in range(3)
    ]
    grads[1] = {**grads[1], "b": grads[1]["b"].at[3].set(jnp.nan)}
    return params, grads, hp


def with_block_sizes(implementation, block_sizes):
    """`implementation` with `block_sizes`, where it takes any."""
    if block_sizes is None or not isinstance(implementation, pallas_amsgrad.Pallas):
        return implementation
    return dataclasses.replace(implementation, block_sizes=block_sizes)


def optimizer(hp, implementation, block_sizes=None):
    """pallas_amsgrad.amsgrad with the hyperparameters and options of `hp`;
    `implementation` is an object or a name from `IMPLEMENTATIONS`."""
    if isinstance(implementation, str):
        implementation = named(implementation)
    return pallas_amsgrad.amsgrad(
        **composition.pallas_kwargs(hp),
        implementation=with_block_sizes(implementation, block_sizes),
    )


def check_against_spec(
    implementation,
    params,
    grads,
    hp,
    block_sizes=None,
    max_ulps=tolerances.IMPLEMENTATION_ULPS,
    state=None,
):
    """init equals optax's (or the steps start from `state`); then per step,
    `update` and `step` from the same state within `max_ulps` of the spec, and
    the same state from both (clipping and decay widen `max_ulps`,
    see `tolerances.for_recipe`). `hp`'s recipe options are the optax
    composition's (tests/composition.py), whose state the implementation keeps."""
    opt = optimizer(hp, implementation, block_sizes)
    max_ulps = tolerances.for_recipe(
        max_ulps, clips=hp.max_grad_norm is not None, decays=hp.decays
    )
    if state is None:
        state = opt.init(params)
        tolerances.assert_trees_equal(state, composition.init(params, hp), "init: ")

    update, step = jax.jit(opt.update), jax.jit(opt.step)
    for i, g in enumerate(grads):
        # Each step starts the spec from the implementation's own state, so
        # last-bit differences are judged per step rather than compounded.
        spec_state = composition.spec_state_of(state, hp)
        updates, new_state = update(g, state, params)
        new_params, step_state = step(g, state, params)
        expected_updates, expected_state = spec.update(g, spec_state, hp, params)
        expected_params, _ = spec.step(g, spec_state, params, hp)
        context = f"step {i}: "
        tolerances.assert_trees_equal(
            step_state, new_state, context + "step vs update state: "
        )
        tolerances.assert_trees_ulp_close(
            (updates, new_state, new_params),
            (
                expected_updates,
                composition.optax_state_of(expected_state, hp, params),
                expected_params,
            ),
            max_ulps,
            context,
            scales=tolerances.summand_scales(g, spec_state, params, hp),
        )
        state, params = new_state, new_params
