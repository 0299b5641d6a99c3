"""The step on 8 devices: per-shard kernels, no collectives, same bits.

Every sharded result is compared bitwise with the same step run unsharded on
one device, and with the spec within the suite's per-dtype ULPs (the step's
own distance from the spec, as on one device; see tests/tolerances.py).
"""

from __future__ import annotations

import re

import exporting
import jax
import jax.numpy as jnp
import leaf_tables
import optax
import pytest
import tolerances
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import amsgrad_spec as spec
import pallas_amsgrad

# Collective ops of XLA's HLO; a per-shard step has none of them.
COLLECTIVES = re.compile(
    r"\b(all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter|"
    r"collective-broadcast|ragged-all-to-all)(-start)?\("
)
MESHES = {"1d": ((8,), ("data",)), "2d": ((4, 2), ("data", "model"))}
# (shape, dtype, spec over ("data", "model")): leaves replicated, sharded on
# one axis, on two axes, and on two axes of one dim; two dtype groups.
LEAVES = {
    "embed": ((64, 256), jnp.float32, P("data", "model")),
    "dense": {
        "w": ((32, 128), jnp.bfloat16, P(None, "model")),
        "b": ((128,), jnp.float32, P("data")),
    },
    "heads": ((8, 16, 128), jnp.bfloat16, P("data", None, "model")),
    "flat": ((16, 128), jnp.float32, P(("data", "model"))),
    "norm": ((128,), jnp.float32, P()),
    "scale": ((), jnp.float32, P()),
}
HP = spec.Hyperparams(learning_rate=0.01, b1=0.9, b2=0.99, eps=1e-6)
STEPS = 3


def _on_mesh(spec_, axis_names):
    """`spec_` with the axes a mesh lacks left out (the 1-D mesh has no model)."""

    def keep(entry):
        if isinstance(entry, tuple):
            kept = tuple(a for a in entry if a in axis_names)
            return kept or None
        return entry if entry in axis_names else None

    return P(*map(keep, spec_))


def make_mesh(name, axis_type):
    shape, names = MESHES[name]
    return jax.make_mesh(shape, names, axis_types=(axis_type,) * len(names))


def shardings(mesh):
    return jax.tree.map(
        lambda leaf: NamedSharding(mesh, _on_mesh(leaf[2], mesh.axis_names)),
        LEAVES,
        is_leaf=leaf_tables.is_leaf,
    )


def values(seed):
    return leaf_tables.host_values(LEAVES, seed)


def on_cpu(implementation):
    """ "pallas" as the lane runs it, on CPU devices: lowered for CPU alone
    (the export tests trace the TPU and GPU kernels themselves)."""
    if implementation == "pallas":
        return pallas_amsgrad.Pallas(platforms=("cpu",))
    return implementation


def optimizer(implementation):
    return pallas_amsgrad.amsgrad(
        HP.learning_rate, HP.b1, HP.b2, HP.eps, implementation=on_cpu(implementation)
    )


def place(tree, tree_shardings):
    return jax.tree.map(jax.device_put, tree, tree_shardings)


def state_shardings(opt, param_shardings, mesh):
    """The state's shardings: each moment as its param, the count replicated."""
    abstract = jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf[0], leaf[1]),
        LEAVES,
        is_leaf=leaf_tables.is_leaf,
    )
    state = jax.eval_shape(opt.init, abstract)
    replicated = NamedSharding(mesh, P())
    moments = state[0]._replace(
        count=replicated, mu=param_shardings, nu=param_shardings, nu_max=param_shardings
    )
    return (moments, state[1])


def run(opt, entry, params, state, grads):
    """`STEPS` jitted steps (`update` + apply, or the fused `step`)."""

    def step(params, state, grads):
        if entry == "step":
            return opt.step(grads, state, params)
        updates, state = opt.update(grads, state, params)
        return jax.tree.map(
            lambda p, u: (p + u).astype(p.dtype), params, updates
        ), state

    jitted = jax.jit(step, donate_argnums=(0, 1))
    for i in range(STEPS):
        params, state = jitted(params, state, grads[i])
    return params, state, jitted


def unsharded_and_sharded(opt, grads, mesh_name, axis_type):
    """`STEPS` donated `step`s from `values(0)` with `grads`, on one device and
    on the mesh (state from `init` on the sharded params): ((params, state)
    unsharded, (params, state) sharded, the sharded step compiled)."""
    params = values(0)
    expected_params, expected_state, _ = run(
        opt, "step", params, opt.init(params), grads
    )
    mesh = make_mesh(mesh_name, axis_type)
    param_shardings = shardings(mesh)
    with jax.set_mesh(mesh):
        sharded_params = place(params, param_shardings)
        sharded_grads = [place(g, param_shardings) for g in grads]
        new_params, new_state, jitted = run(
            opt, "step", sharded_params, opt.init(sharded_params), sharded_grads
        )
        compiled = jitted.lower(new_params, new_state, sharded_grads[0]).compile()
    return (expected_params, expected_state), (new_params, new_state), compiled


@pytest.mark.parametrize("entry", ["step", "update"])
@pytest.mark.parametrize("implementation", ["pallas", "xla"])
@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit], ids=str)
@pytest.mark.parametrize("mesh_name", MESHES)
def test_sharded_step_equals_unsharded(mesh_name, axis_type, implementation, entry):
    opt = optimizer(implementation)
    params, grads = values(0), [values(1 + i) for i in range(STEPS)]
    expected_params, expected_state, _ = run(
        opt, entry, params, opt.init(params), grads
    )

    mesh = make_mesh(mesh_name, axis_type)
    param_shardings = shardings(mesh)
    with jax.set_mesh(mesh):
        sharded_params = place(params, param_shardings)
        state = jax.jit(
            opt.init, out_shardings=state_shardings(opt, param_shardings, mesh)
        )(sharded_params)
        sharded_grads = [place(g, param_shardings) for g in grads]
        new_params, new_state, jitted = run(
            opt, entry, sharded_params, state, sharded_grads
        )
        compiled = jitted.lower(new_params, new_state, sharded_grads[0]).compile()

    assert not COLLECTIVES.findall(compiled.as_text())
    for name, tree in (("params", new_params), ("mu", new_state[0].mu)):
        for (path, leaf), sharding in zip(
            jax.tree_util.tree_flatten_with_path(tree)[0],
            jax.tree.leaves(param_shardings),
            strict=True,
        ):
            assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim), (
                f"{name}{jax.tree_util.keystr(path)}: {leaf.sharding} != {sharding}"
            )
    tolerances.assert_trees_equal(
        (new_params, new_state), (expected_params, expected_state)
    )


@pytest.mark.parametrize("implementation", ["pallas", "xla"])
@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit], ids=str)
def test_sharded_step_matches_spec(axis_type, implementation):
    opt = optimizer(implementation)
    params, grads = values(0), values(1)
    mesh = make_mesh("2d", axis_type)
    param_shardings = shardings(mesh)
    # A state after some steps, so that nu_max differs from nu.
    state = opt.init(params)
    for seed in (2, 3):
        params, state = jax.jit(opt.step)(values(seed), state, params)
    with jax.set_mesh(mesh):
        new_params, new_state = jax.jit(opt.step)(
            place(grads, param_shardings),
            jax.device_put(state, state_shardings(opt, param_shardings, mesh)),
            place(params, param_shardings),
        )
    spec_state = spec.AmsgradState(*state[0])
    expected_params, expected_state = spec.step(grads, spec_state, params, HP)
    _, state_scales, param_scales = tolerances.summand_scales(
        grads, spec_state, params, HP
    )
    tolerances.assert_trees_ulp_close(
        (new_params, tuple(new_state[0])),
        (expected_params, tuple(expected_state)),
        tolerances.IMPLEMENTATION_ULPS,
        scales=(param_scales, tuple(state_scales[0])),
    )


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit], ids=str)
def test_donated_shards_are_updated_in_place(axis_type):
    opt = optimizer("pallas")
    mesh = make_mesh("2d", axis_type)
    param_shardings = shardings(mesh)
    with jax.set_mesh(mesh):
        params = place(values(0), param_shardings)
        state = opt.init(params)
        buffers = {
            shard.device: shard.data.unsafe_buffer_pointer()
            for shard in params["embed"].addressable_shards
        }
        step = jax.jit(lambda p, s, g: opt.step(g, s, p), donate_argnums=(0, 1))
        new_params, _ = step(params, state, place(values(1), param_shardings))
    assert params["embed"].is_deleted()
    assert {
        shard.device: shard.data.unsafe_buffer_pointer()
        for shard in new_params["embed"].addressable_shards
    } == buffers


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_explicit_axes_step_exports_per_shard_kernels(platform):
    """Under Explicit axes the step is a shard_map around the Mosaic kernel,
    which jax.export lowers for TPU and GPU from here: the kernel sees each
    device's shard shapes, and the program has no collective."""
    opt = optimizer(pallas_amsgrad.Pallas())
    mesh = exporting.mesh_for(make_mesh("2d", AxisType.Explicit), platform)
    param_shardings = shardings(mesh)
    abstract = jax.tree.map(
        lambda leaf, s: jax.ShapeDtypeStruct(leaf[0], leaf[1], sharding=s),
        LEAVES,
        param_shardings,
        is_leaf=leaf_tables.is_leaf,
    )
    with exporting.using(mesh):
        state = jax.eval_shape(opt.init, abstract)
        exported = jax.export.export(
            jax.jit(lambda p, s, g: opt.step(g, s, p), donate_argnums=(0, 1)),
            platforms=[platform],
        )(abstract, state, abstract)
    module = exported.mlir_module()
    custom_call = {"tpu": "tpu_custom_call", "cuda": "mosaic_gpu_v2"}[platform]
    kernel_calls = [line for line in module.splitlines() if custom_call in line]
    assert kernel_calls
    # The embed (64, 256) over (4, 2) devices: a (16, 128) shard per kernel
    # (TPU views it as (1, 16, 128)).
    assert any(
        "x16x128xf32>" in line or "<16x128xf32>" in line for line in kernel_calls
    )
    assert not any("64x256xf32>" in line for line in kernel_calls)
    assert "sdy.manual_computation" in module
    assert not re.search(
        r"stablehlo\.(all_gather|all_reduce|all_to_all|collective_permute|"
        r"reduce_scatter)",
        module,
    )


RECIPE = dict(
    weight_decay=0.1,
    mask=lambda tree: jax.tree.map(lambda x: x.ndim >= 2, tree),
    max_grad_norm=0.05,
    max_consecutive_errors=2,
)


@pytest.mark.parametrize("implementation", ["pallas", "xla"])
@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit], ids=str)
def test_sharded_recipe_only_reduces_the_norm(axis_type, implementation):
    """Clipping, masked decay and skips on a mesh: the global norm's sum is
    the only collective of the step (outside the branch that re-reads
    non-finite gradients), one scalar all-reduce; results as unsharded, up to
    the norm's order of summation."""
    opt = pallas_amsgrad.amsgrad(
        HP.learning_rate, implementation=implementation, **RECIPE
    )
    grads = [values(1 + i) for i in range(STEPS)]
    grads[1] = jax.tree.map(lambda g: g * jnp.nan, grads[1])  # A skipped step.
    expected, (new_params, new_state), compiled = unsharded_and_sharded(
        opt, grads, "2d", axis_type
    )
    text = compiled.as_text()
    entry = text[text.index("ENTRY") :]
    entry = entry[: entry.index("\n}")]
    # The leaves are split over data, model, both and neither; their partial
    # sums still meet in one all-reduce, over all 8 devices.
    collectives = [line for line in entry.splitlines() if COLLECTIVES.search(line)]
    assert len(collectives) == 1, collectives
    assert re.search(r"= f32\[\] all-reduce\(", collectives[0]), collectives
    # jaxlib 0.11.2 on prints the groups by mesh axes.
    assert re.search(
        r"replica_groups=(\{\{0,1,2,3,4,5,6,7\}\}|mesh\[[^]]*\] \{'data','model'\})",
        collectives[0],
    ), collectives
    assert int(new_state.total_notfinite) == 1
    tolerances.assert_trees_normwise_close((new_params, new_state), expected)


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit], ids=str)
@pytest.mark.parametrize("mesh_name", MESHES)
def test_recipe_clips_by_the_global_norm_of_whole_leaves(mesh_name, axis_type):
    """Each element counts once in the sharded norm, whichever axes its leaf
    is split over or replicated on: with the clip active, one step's mu is
    `(1 - b1) * g * max_grad_norm / norm`, as with the unsharded norm."""
    opt = pallas_amsgrad.amsgrad(
        HP.learning_rate, HP.b1, HP.b2, HP.eps, max_grad_norm=1e-3
    )
    params, grads = values(0), values(1)
    _, expected = opt.update(grads, opt.init(params))
    mesh = make_mesh(mesh_name, axis_type)
    param_shardings = shardings(mesh)
    with jax.set_mesh(mesh):
        sharded_params = place(params, param_shardings)
        _, state = jax.jit(opt.update)(
            place(grads, param_shardings), opt.init(sharded_params)
        )
    # A norm off by any leaf's replication (2 to 8 copies) would move mu by
    # far more than the norm's rounding.
    tolerances.assert_trees_normwise_close(
        optax.tree_utils.tree_get(state, "mu"),
        optax.tree_utils.tree_get(expected, "mu"),
    )


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit], ids=str)
def test_sharded_step_with_16_bit_nu_equals_unsharded(axis_type):
    """nu_dtype=bfloat16 on the 2-D mesh: the state's nu and nu_max in
    bfloat16, sharded as their params, with the unsharded step's bits."""
    opt = pallas_amsgrad.amsgrad(
        HP.learning_rate,
        HP.b1,
        HP.b2,
        HP.eps,
        nu_dtype=jnp.bfloat16,
        implementation="pallas",
    )
    grads = [values(1 + i) for i in range(STEPS)]
    expected, (new_params, new_state), _ = unsharded_and_sharded(
        opt, grads, "2d", axis_type
    )
    param_shardings = shardings(make_mesh("2d", axis_type))
    for leaf, sharding in zip(
        jax.tree.leaves(new_state[0].nu_max),
        jax.tree.leaves(param_shardings),
        strict=True,
    ):
        assert leaf.dtype == jnp.bfloat16
        assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)
    tolerances.assert_trees_equal((new_params, new_state), expected)


def _bfloat16_moments(implementation, stochastic_rounding=True):
    """bfloat16 moments of every leaf, rounded stochastically (or to
    nearest)."""
    return pallas_amsgrad.amsgrad(
        HP.learning_rate,
        HP.b1,
        HP.b2,
        HP.eps,
        mu_dtype=jnp.bfloat16,
        nu_dtype=jnp.bfloat16,
        stochastic_rounding=stochastic_rounding,
        seed=11,
        implementation=on_cpu(implementation),
    )


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit], ids=str)
def test_sharded_stochastic_rounding_equals_unsharded(implementation, axis_type):
    """Each element's random bits come from its place in the whole leaf, so
    every shard rounds as the unsharded step does, bitwise: the 2-D mesh
    splits leaves into runs of them (params['flat']) and along later dims,
    so that a shard's rows are strided in the whole leaf (params['embed'],
    params['heads'])."""
    opt = _bfloat16_moments(implementation)
    grads = [values(1 + i) for i in range(STEPS)]
    expected, actual, _ = unsharded_and_sharded(opt, grads, "2d", axis_type)
    tolerances.assert_trees_equal(actual, expected)
    # Rounded stochastically indeed: not the round-to-nearest step's bits.
    nearest = _bfloat16_moments(implementation, stochastic_rounding=False)
    _, rounded_to_nearest, _ = run(
        nearest, "step", values(0), nearest.init(values(0)), grads
    )
    assert any(
        not jnp.array_equal(a, b)
        for a, b in zip(
            jax.tree.leaves(expected[1][0].mu),
            jax.tree.leaves(rounded_to_nearest[0].mu),
            strict=True,
        )
    )
