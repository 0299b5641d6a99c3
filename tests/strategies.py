"""All hypothesis strategies of the suite, named as plural nouns.

Sizes stay small: the Pallas interpreter's cost grows with grid steps times
array size. `MAX_LEAF_SIZE` bounds every leaf.
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from hypothesis import settings
from hypothesis import strategies as st

import amsgrad_spec as spec

MAX_LEAF_SIZE = int(os.environ.get("PALLAS_AMSGRAD_TEST_MAX_LEAF_SIZE", "3000"))
STEPS = 3  # At least three consecutive steps, one of them with a zero gradient.

# Shapes that stress the (rows, 128) layout: scalars, size 1, sizes that are
# not multiples of 128 or of 8 x 128, exact multiples, and empty leaves.
EDGE_SHAPES = [
    (),
    (1,),
    (7,),
    (127,),
    (128,),
    (129,),
    (3, 5),
    (8, 128),
    (17, 130),
    (0,),
    (2, 0),
]


def _shape_fits(shape) -> bool:
    return math.prod(shape) <= MAX_LEAF_SIZE


shapes = st.one_of(
    st.sampled_from(EDGE_SHAPES),
    st.lists(st.integers(1, 64), min_size=1, max_size=3).map(tuple).filter(_shape_fits),
)

param_shapes = st.lists(shapes, min_size=2, max_size=5).filter(
    lambda leaves: sum(math.prod(s) > 0 for s in leaves) >= 2
)
"""Leaf shapes of a parameter tree; at least two non-empty leaves, as optax
divides by the bias correction only then (see `spec.debias`)."""


def as_tree(leaves):
    """A nested pytree (dict, list, tuple) over a flat list of leaves."""
    head, *rest = leaves
    return {
        "embed": head,
        "blocks": [tuple(rest[: len(rest) // 2]), {"w": rest[len(rest) // 2 :]}],
    }


@st.composite
def trajectories(draw, dtype, shapes_strategy=param_shapes, steps=STEPS):
    """(params, [grads per step]) with one step's gradient exactly zero.

    Values span several binades so tiny and large moments both occur.
    """
    leaf_shapes = draw(shapes_strategy)
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    zero_step = draw(st.integers(0, steps - 1))
    scale = draw(st.sampled_from([1e-3, 1.0, 30.0]))

    def sample(shape, s):
        magnitudes = np.exp(rng.uniform(-4, 2, shape))
        return jnp.asarray(s * magnitudes * rng.choice([-1.0, 1.0], shape), dtype)

    params = as_tree([sample(shape, 1.0) for shape in leaf_shapes])
    grads = []
    for step in range(steps):
        g = [sample(shape, scale * (step != zero_step)) for shape in leaf_shapes]
        grads.append(as_tree(g))
    return params, grads


@st.composite
def interpreter_cases(draw, dtype, mu_dtype, block_rows_choices):
    """(params, grads, hp, block_rows) for the accelerator-interpreter lanes:
    2-4 leaves of any shape, with blocks small enough to span several."""
    leaf_shapes = st.lists(shapes, min_size=2, max_size=4).filter(
        lambda leaves: any(math.prod(s) for s in leaves)  # A kernel must run.
    )
    params, grads = draw(trajectories(dtype, shapes_strategy=leaf_shapes))
    return (
        params,
        grads,
        draw(hyperparams(mu_dtype)),
        draw(st.sampled_from(block_rows_choices)),
    )


# (param dtype, mu_dtype) for the interpreter lanes: every kernel path (a
# packed 16-bit block, an aliased mu, a mu promoted to a new buffer, a 16-bit
# mu beside float32 params) at a few examples each, as each example is slow.
INTERPRETER_DTYPE_PAIRS = [
    (jnp.float32, None),
    (jnp.bfloat16, None),
    (jnp.float16, jnp.float32),
    (jnp.float32, jnp.bfloat16),
]
INTERPRETER_DTYPE_IDS = [
    f"{jnp.dtype(p).name}-mu={m and jnp.dtype(m).name}"
    for p, m in INTERPRETER_DTYPE_PAIRS
]


def _piecewise_schedule(base):
    return optax.piecewise_constant_schedule(base, {1: 0.5, 2: 3.0})


@st.composite
def hyperparams(
    draw,
    mu_dtype=None,
    learning_rates=("constant", "schedule"),
    nu_dtypes=(None,),
    stochastic_rounding=(False,),
):
    """spec.Hyperparams over both bias-correction flags, eps_root, lr kinds,
    `nu_dtypes` and `stochastic_rounding` (with a seed drawn where on)."""
    lr = draw(st.sampled_from([1e-3, 0.1]))
    stochastic = draw(st.sampled_from(stochastic_rounding))
    kind = draw(st.sampled_from(learning_rates))
    return spec.Hyperparams(
        learning_rate=_piecewise_schedule(lr) if kind == "schedule" else lr,
        b1=draw(st.sampled_from([0.9, 0.5])),
        b2=draw(st.sampled_from([0.999, 0.95])),
        eps=draw(st.sampled_from([1e-8, 1e-3])),
        eps_root=draw(st.sampled_from([0.0, 1e-6])),
        mu_dtype=mu_dtype,
        bias_correction_mu=draw(st.booleans()),
        bias_correction_nu=draw(st.booleans()),
        nu_dtype=draw(st.sampled_from(nu_dtypes)),
        stochastic_rounding=stochastic,
        seed=draw(st.integers(0, 2**32 - 1)) if stochastic else 0,
    )


def _matrices_only(grads):
    return jax.tree.map(lambda g: g.ndim >= 2, grads)


# Masks of `as_tree`'s trees: a prefix of bools, and a callable.
MASKS = {
    "prefix": {"embed": False, "blocks": True},
    "matrices": _matrices_only,
}


@st.composite
def recipes(draw, hp):
    """`hp` with the training recipe's options drawn: weight decay (a scalar
    or a schedule, masked or not), global-norm clipping (a bound that clips
    or does not) and non-finite skips, each on or off."""
    weight_decay = draw(
        st.sampled_from([None, 0.0, 1e-2, 0.5, optax.linear_schedule(0.1, 0.0, 4)])
    )
    mask = draw(st.sampled_from([None, *MASKS.values()]))
    return dataclasses.replace(
        hp,
        weight_decay=weight_decay,
        mask=mask if weight_decay is not None else None,
        max_grad_norm=draw(st.sampled_from([None, 1e-3, 1.0, 1e6])),
        max_consecutive_errors=draw(st.sampled_from([None, 1, 2])),
    )


@st.composite
def non_finite_steps(draw, trajectory):
    """(params, grads) with NaN or inf planted in some steps' gradients: a run
    of consecutive bad steps, long enough to reach `max_consecutive_errors`."""
    params, grads = trajectory
    bad_steps = draw(st.lists(st.integers(0, len(grads) - 1), max_size=len(grads)))
    grads = list(grads)
    for step in set(bad_steps):
        leaves, treedef = jax.tree.flatten(grads[step])
        sized = [k for k, leaf in enumerate(leaves) if leaf.size]
        if not sized:
            break
        leaf = draw(st.sampled_from(sized))
        position = draw(st.integers(0, leaves[leaf].size - 1))
        value = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        flat = leaves[leaf].reshape(-1).at[position].set(value)
        leaves[leaf] = flat.reshape(leaves[leaf].shape)
        grads[step] = treedef.unflatten(leaves)
    return params, grads


def a_third_of_the_examples():
    """For the grids whose examples each compile both steps anew: 2 per cell
    in CI, a third of `dev`'s."""
    return settings(max_examples=max(2, settings.default.max_examples // 3))


PARAM_DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]
MU_DTYPES = [None, jnp.bfloat16, jnp.float16, jnp.float32]
NU_DTYPES = [jnp.bfloat16, jnp.float16, jnp.float32]
