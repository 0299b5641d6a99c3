"""stochastic_rounding=True on every implementation, against the spec.

The random bits are the spec's (`amsgrad_spec.rounding`): every
implementation computes the same bits for the same element, so the kernels
(interpreted, and in the TPU and GPU interpreters) and the XLA path give the
same stored values bitwise; against the spec they are within the usual ULPs
(a last-bit difference in float32 can move a value across its rounding
threshold, one 16-bit ULP). Properties shared with round-to-nearest (nu_max
never decreases, block-size invariance, kernel == XLA path) are drawn with it
on in tests/test_properties.py; sharded steps in tests/multidevice/.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

import exporting
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import strategies
import tolerances
from hypothesis import given, note
from hypothesis import strategies as st
from implementations import (
    check_against_spec,
    gpu_interpreted,
    optimizer,
    tpu_interpreted,
)

import amsgrad_spec as spec
import pallas_amsgrad
from pallas_amsgrad import _implementations, _math, _rounding
from pallas_amsgrad.kernels import common

SIXTEEN_BITS = [jnp.bfloat16, jnp.float16]


@strategies.a_third_of_the_examples()
@given(data=st.data())
@pytest.mark.parametrize(
    "dtype", strategies.PARAM_DTYPES, ids=lambda d: jnp.dtype(d).name
)
def test_matches_spec(implementation, dtype, data):
    """16-bit moments (any mix) and params rounded stochastically, half the
    time with the recipe's options."""
    trajectory = data.draw(strategies.trajectories(dtype))
    hp = data.draw(
        strategies.hyperparams(
            data.draw(st.sampled_from([None, *SIXTEEN_BITS])),
            nu_dtypes=[None, *SIXTEEN_BITS],
            stochastic_rounding=(True,),
        )
    )
    if data.draw(st.booleans(), label="with the recipe"):
        hp = data.draw(strategies.recipes(hp))
    if hp.max_consecutive_errors is not None:
        trajectory = data.draw(strategies.non_finite_steps(trajectory))
    note(f"{hp=}")
    check_against_spec(implementation, *trajectory, hp)


def test_float64_params_under_x64_match_spec(implementation):
    """With 64-bit types enabled, float64 params computed in float64 and
    16-bit moments rounded stochastically: each moment is taken as float32
    first, as the spec takes it."""
    rng = np.random.default_rng(11)
    with jax.enable_x64(True):
        params = jnp.asarray(rng.normal(size=(4, 300)))
        grads = [jnp.asarray(rng.normal(size=(4, 300)) * 10.0**-k) for k in range(3)]
        hp = spec.Hyperparams(
            0.01, mu_dtype=jnp.bfloat16, nu_dtype=jnp.float16, stochastic_rounding=True
        )
        check_against_spec(implementation, params, grads, hp)


def _tree():
    """Leaves of whole blocks, a tail, a 3-D leaf and a vector under a row,
    in bfloat16 and float32 (whose float16 nu is rounded too)."""
    return {
        "w": jnp.linspace(-1, 1, 48 * common.LANES)
        .reshape(48, common.LANES)
        .astype(jnp.bfloat16),
        "wide": jnp.linspace(-1, 1, 40 * 300).reshape(40, 300),
        "3d": jnp.linspace(-2, 2, 5 * 3 * 7).reshape(5, 3, 7).astype(jnp.bfloat16),
        "b": jnp.linspace(-2, 2, 100),
    }


def _two_steps(implementation, hp, params):
    opt = optimizer(hp, implementation)
    state, step = opt.init(params), jax.jit(opt.step)
    for s in range(2):
        grads = jax.tree.map(
            lambda p, s=s: jnp.cos(p * (2 + s)).astype(p.dtype), params
        )
        params, state = step(grads, state, params)
    return params, state


HP = spec.Hyperparams(
    0.01, nu_dtype=jnp.float16, stochastic_rounding=True, seed=2**31 + 5
)


@pytest.mark.slow
@pytest.mark.parametrize(
    "interpreted",
    [lambda: tpu_interpreted(32), lambda: gpu_interpreted(16)],
    ids=["tpu", "gpu"],
)
def test_device_kernels_give_the_xla_paths_bits(interpreted):
    """The TPU kernel (blocks of a (leading, rows, cols) view, leaves streamed
    by shape) and the GPU kernel (blocks of 128-lane rows, a launch per leaf)
    number each element as the XLA path does: the same bits."""
    params = _tree()
    tolerances.assert_trees_equal(
        _two_steps(interpreted(), HP, params), _two_steps("xla", HP, params)
    )


def test_a_leafs_bits_follow_its_path_not_its_place():
    """A leaf's stream is keyed by its key path: adding leaves around it (or
    reordering the tree) keeps its bits; the same values at another path
    round otherwise."""
    x = jnp.linspace(-1, 1, 3000).astype(jnp.bfloat16)
    hp = dataclasses.replace(HP, nu_dtype=jnp.bfloat16)
    alone = _two_steps("xla", hp, {"w": x})
    crowded = _two_steps(
        "xla", hp, {"a": jnp.ones(7, jnp.bfloat16), "w": x, "z": [jnp.zeros(3)]}
    )
    tolerances.assert_trees_equal(crowded[0]["w"], alone[0]["w"])
    tolerances.assert_trees_equal(crowded[1][0].nu["w"], alone[1][0].nu["w"])
    renamed = _two_steps("xla", hp, {"v": x})
    assert not jnp.array_equal(renamed[1][0].nu["v"], alone[1][0].nu["w"])


# (whole shape, the shard's start, the shard's shape): one run of the leaf;
# a column split; a single column (a run of stride 4); a split last dim of a
# 3-D leaf; a split middle dim of a 4-D leaf, whose TPU view merges it into
# leading after a whole dim (two leading runs, the inner of 3); three runs
# of leading dims; a vector's second half.
SHARDS = {
    "rows": ((32, 130), (16, 0), (16, 130)),
    "cols": ((16, 256), (0, 128), (16, 128)),
    "thin": ((10, 4), (0, 3), (10, 1)),
    "last": ((4, 6, 40), (0, 0, 20), (4, 6, 20)),
    "middle": ((3, 6, 5, 40), (0, 3, 0, 0), (3, 3, 5, 40)),
    "leading": ((2, 4, 6, 5, 8), (0, 2, 3, 0, 0), (2, 2, 3, 5, 8)),
    "vector": ((512,), (256,), (256,)),
}


@functools.partial(jax.jit, static_argnums=(0, 3))
def _group_on(implementation, leaves, starts, shapes):
    """One step of every leaf in bfloat16, rounded stochastically, as
    `_sharding` runs a group on a device's shards (`starts` in the whole
    leaves of `shapes`). Jitted: one program, where op by op the XLA path's
    bits would dispatch hundreds of small computations."""
    operands = dataclasses.replace(_math.STEP, stochastic=(True,) * 4)
    coefficients = _math.Coefficients(
        step_size=-0.01,
        one_minus_b1=0.1,
        b1=0.9,
        one_minus_b2=0.001,
        b2=0.999,
        eps=1e-8,
        eps_root=0.0,
        inverse_bias_correction_mu=10.0,
        inverse_bias_correction_nu=1000.0,
    ).pack(jnp.float32)
    keys = jnp.stack([_rounding.stream_keys(3, 1, path) for path in SHARDS])
    return _implementations.call(
        pallas_amsgrad.Xla() if implementation == "xla" else implementation,
        coefficients,
        leaves,
        out_dtypes=(jnp.bfloat16,) * 4,
        operands=operands,
        streams=_rounding.Streams(keys, starts, shapes),
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "implementation",
    [
        "xla",
        pallas_amsgrad.Pallas(block_sizes=pallas_amsgrad.BlockSizes(16)),
        # Blocks of 4 leading slices (of 16 x 128 padded), cut to 3 for the
        # shards whose innermost leading run has 3.
        tpu_interpreted(64),
        gpu_interpreted(16),
    ],
    ids=["xla", "interpreted", "tpu", "gpu"],
)
def test_a_shard_takes_the_bits_of_its_place_in_the_whole_leaf(implementation):
    """Each kernel places a shard's elements in the whole leaf (by its base
    and `_rounding.runs`), so a shard's step equals that slice of the whole
    leaf's bit for bit, however it is split; numbered from its own first
    element as if contiguous, the shards would round otherwise."""
    shapes = tuple(whole for whole, _, _ in SHARDS.values())
    windows = [
        tuple(slice(i, i + n) for i, n in zip(start, local, strict=True))
        for _, start, local in SHARDS.values()
    ]
    whole_leaves, shard_leaves = [], []
    for k, ((shape, _, _), window) in enumerate(
        zip(SHARDS.values(), windows, strict=True)
    ):
        x = jnp.linspace(-1, 1 + k, math.prod(shape)).reshape(shape)
        leaf = (x, jnp.cos(3 * x), 0.1 * x, 0.01 * x * x, 0.02 * x * x)
        leaf = tuple(a.astype(jnp.bfloat16) for a in leaf)
        whole_leaves.append(leaf)
        shard_leaves.append(tuple(a[window] for a in leaf))
    whole = _group_on(
        implementation, whole_leaves, tuple((0,) * len(s) for s in shapes), shapes
    )
    # int32, as a device reads its place from its mesh axis indices.
    starts = tuple(
        tuple(jnp.int32(i) for i in start) for _, start, _ in SHARDS.values()
    )
    sharded = _group_on(implementation, shard_leaves, starts, shapes)
    as_contiguous = _group_on(
        "xla", shard_leaves, starts, tuple(local for _, _, local in SHARDS.values())
    )
    for k, (name, window) in enumerate(zip(SHARDS, windows, strict=True)):
        expected = tuple(out[window] for out in whole[k])
        tolerances.assert_trees_equal(sharded[k], expected, name)
        if name not in ("rows", "vector"):  # Not contiguous.
            assert not jnp.array_equal(as_contiguous[k][2], expected[2]), name


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_kernels_lower_shards_strided_in_their_leaves(platform):
    """Both Mosaic lowerings place every kind of shard in `SHARDS` (the GPU
    kernel by integer division of its rows' indices, the TPU kernel by scalar
    division of a block's leading index), with the shards' starts traced, as
    a device reads them from its mesh position: a launch per leaf on GPU, one
    for the group on TPU."""
    shapes = tuple(whole for whole, _, _ in SHARDS.values())
    leaves = [
        tuple(jax.ShapeDtypeStruct(local, jnp.bfloat16) for _ in range(5))
        for _, _, local in SHARDS.values()
    ]
    starts = [tuple(jnp.uint32(i) for i in start) for _, start, _ in SHARDS.values()]

    def group(leaves, starts):
        return _group_on(
            pallas_amsgrad.Pallas(), leaves, tuple(map(tuple, starts)), shapes
        )

    module = exporting.export(jax.jit(group), platform, leaves, starts)
    target = {"tpu": "tpu_custom_call", "cuda": "mosaic_gpu_v2"}[platform]
    launches = len(exporting.launches(module, target))
    assert launches == {"tpu": 1, "cuda": len(SHARDS)}[platform]


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
def test_updates_below_half_an_ulp_survive_on_average(implementation):
    """bfloat16 params at 1.0 and a first step of -lr per element (AMSGrad's
    first direction is the gradient's sign): with lr a quarter of the spacing
    2**-8 below 1.0, rounding to nearest keeps every param at 1.0, while
    stochastic rounding moves each down a spacing with probability lr / 2**-8,
    so the mean moves by lr, within 6 sigma of the binomial count."""
    n, lr = 1 << 14, 2.0**-10
    params = jnp.ones(n, jnp.bfloat16)
    grads = jnp.ones(n, jnp.bfloat16)
    for stochastic, seed in ((False, 0), (True, 3)):
        opt = pallas_amsgrad.amsgrad(
            lr, stochastic_rounding=stochastic, seed=seed, implementation=implementation
        )
        new, _ = jax.jit(opt.step)(grads, opt.init(params), params)
        moved = np.asarray(new, np.float64)
        if not stochastic:
            assert (moved == 1.0).all()
            continue
        assert set(np.unique(moved)) == {1.0, 1.0 - 2.0**-8}
        p = lr / 2.0**-8
        down = np.count_nonzero(moved < 1.0)
        assert abs(down - n * p) <= 6 * np.sqrt(n * p * (1 - p)), (down, n * p)


def test_float32_storage_is_rounded_to_nearest_as_ever():
    """Only 16-bit stores round stochastically: float32 params and state
    give the round-to-nearest step's bits."""
    params = {"w": jnp.linspace(-1, 1, 300)}
    nearest = dataclasses.replace(HP, nu_dtype=None, stochastic_rounding=False)
    tolerances.assert_trees_equal(
        _two_steps("xla", dataclasses.replace(HP, nu_dtype=None), params),
        _two_steps("xla", nearest, params),
    )


def test_update_rounds_its_updates_to_nearest():
    """`update` returns updates, which are not stored: they round to nearest;
    the moments it stores round stochastically, as in `step`."""
    params = jnp.linspace(-1, 1, 300).astype(jnp.bfloat16)
    grads = jnp.cos(3 * params)
    hp = dataclasses.replace(HP, nu_dtype=None)  # bfloat16 moments and updates.
    stochastic = optimizer(hp, "xla")
    nearest = optimizer(dataclasses.replace(hp, stochastic_rounding=False), "xla")
    updates, state = stochastic.update(grads, stochastic.init(params))
    expected_updates, expected_state = nearest.update(grads, nearest.init(params))
    assert updates.dtype == jnp.bfloat16
    tolerances.assert_trees_equal(updates, expected_updates)
    assert not jnp.array_equal(state[0].nu, expected_state[0].nu)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_kernels_lower_with_stochastic_rounding(platform):
    """Both Mosaic lowerings take the integer hash and the rounding: the
    same launches as rounding to nearest, one more scalar operand each."""
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _tree())
    target = {"tpu": "tpu_custom_call", "cuda": "mosaic_gpu_v2"}[platform]
    launches = []
    for stochastic in (False, True):
        opt = pallas_amsgrad.amsgrad(
            0.01,
            mu_dtype=jnp.bfloat16,
            nu_dtype=jnp.bfloat16,
            stochastic_rounding=stochastic,
            implementation="pallas",
        )
        state = jax.eval_shape(opt.init, params)
        module = exporting.export(jax.jit(opt.step), platform, params, state, params)
        launches.append(
            [
                len(re.search(rf"@{target}\(([^)]*)\)", line)[1].split(","))
                for line in exporting.launches(module, target)
            ]
        )
    assert len(launches[1]) == len(launches[0]) > 0
    assert [n - 1 for n in launches[1]] == launches[0]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"seed": 1.5}, r"seed=1.5 must be an integer scalar"),
        ({"seed": "3"}, r"seed='3' must be an integer scalar"),
        ({"seed": np.ones(2, np.int32)}, r"seed=.* must be an integer scalar"),
        ({"seed": True}, r"seed=True must be an integer scalar"),
        ({"stochastic_rounding": "yes"}, r"stochastic_rounding='yes' must be True"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(TypeError, match=message):
        pallas_amsgrad.amsgrad(0.1, **{"stochastic_rounding": True, **kwargs})
    with pytest.raises(TypeError, match=message):
        pallas_amsgrad.scale_by_amsgrad(**{"stochastic_rounding": True, **kwargs})


def test_a_traced_seed_is_a_runtime_value():
    """A seed passed as an int32 array (e.g. per training run) is data."""
    params = jnp.linspace(-1, 1, 300).astype(jnp.bfloat16)
    grads = jnp.cos(3 * params)

    def new_params(seed):
        opt = pallas_amsgrad.amsgrad(0.01, stochastic_rounding=True, seed=seed)
        return opt.step(grads, opt.init(params), params)[0]

    by_array = jax.jit(new_params)(jnp.int32(7))
    tolerances.assert_trees_equal(by_array, new_params(7))
    assert not jnp.array_equal(by_array, new_params(8))
