"""`init` straight into shards, and bad shardings named before anything runs."""

from __future__ import annotations

import exporting
import jax
import jax.numpy as jnp
import leaf_tables
import numpy as np
import optax
import pytest
import test_sharded_step as sharded
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import pallas_amsgrad


def _abstract(mesh):
    return jax.tree.map(
        lambda leaf, s: jax.ShapeDtypeStruct(leaf[0], leaf[1], sharding=s),
        sharded.LEAVES,
        sharded.shardings(mesh),
        is_leaf=leaf_tables.is_leaf,
    )


def _assert_state_sharded_like(state, param_shardings, mesh):
    moments = state[0]
    assert moments.count.sharding.is_equivalent_to(NamedSharding(mesh, P()), 0)
    for tree in (moments.mu, moments.nu, moments.nu_max):
        for leaf, sharding in zip(
            jax.tree.leaves(tree), jax.tree.leaves(param_shardings), strict=True
        ):
            assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit], ids=str)
def test_init_on_abstract_params_creates_each_shard_in_place(axis_type):
    mesh = sharded.make_mesh("2d", axis_type)
    param_shardings = sharded.shardings(mesh)
    opt = pallas_amsgrad.amsgrad(0.1, mu_dtype=jnp.float32)
    abstract = _abstract(mesh)
    with jax.set_mesh(mesh):
        state = opt.init(abstract)
    _assert_state_sharded_like(state, param_shardings, mesh)
    expected = optax.amsgrad(0.1, mu_dtype=jnp.float32).init(sharded.values(0))
    for ours, theirs in zip(
        jax.tree.leaves(state), jax.tree.leaves(expected), strict=True
    ):
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def test_init_under_jit_with_out_shardings_never_builds_a_whole_leaf():
    mesh = sharded.make_mesh("2d", AxisType.Auto)
    param_shardings = sharded.shardings(mesh)
    opt = pallas_amsgrad.amsgrad(0.1)
    out_shardings = sharded.state_shardings(opt, param_shardings, mesh)
    init = jax.jit(opt.init, out_shardings=out_shardings)
    compiled = init.lower(_abstract(mesh)).compile()
    state = init(sharded.place(sharded.values(0), param_shardings))
    _assert_state_sharded_like(state, param_shardings, mesh)
    # Each device's program holds only its own (16, 128) shard of the embed.
    assert "f32[16,128]" in compiled.as_text()
    assert "f32[64,256]" not in compiled.as_text()


def test_unsplittable_abstract_param_is_named():
    mesh = sharded.make_mesh("2d", AxisType.Auto)
    params = {
        "ok": jax.ShapeDtypeStruct(
            (8,), jnp.float32, sharding=NamedSharding(mesh, P("data"))
        ),
        "odd": jax.ShapeDtypeStruct(
            (6, 4), jnp.float32, sharding=NamedSharding(mesh, P("data"))
        ),
    }
    with pytest.raises(
        ValueError,
        match=r"params\['odd'\] has shape \(6, 4\); its dim 0 \(6\) cannot be split",
    ):
        pallas_amsgrad.amsgrad(0.1).init(params)


def _mismatched(mesh):
    """Params and grads sharded one way, state.nu['b'] another."""
    opt = pallas_amsgrad.amsgrad(0.1)
    params = {"a": jnp.ones((8, 16)), "b": jnp.ones((16, 8))}
    with jax.set_mesh(mesh):
        params = jax.device_put(params, NamedSharding(mesh, P("data")))
        state = opt.init(params)
        nu = dict(
            state[0].nu,
            b=jax.device_put(state[0].nu["b"], NamedSharding(mesh, P(None, "data"))),
        )
        state = (state[0]._replace(nu=nu), state[1])
    return opt, params, state


MISMATCH = (
    r"state\.nu\['b'\] is sharded as P\(None, 'data'\) over mesh \{'data': 8\} "
    r"but params\['b'\] as P\('data', None\)"
)


@pytest.mark.parametrize("implementation", ["pallas", "xla"])
def test_mismatched_state_is_named_while_tracing_under_explicit_axes(implementation):
    mesh = sharded.make_mesh("1d", AxisType.Explicit)
    opt, params, state = _mismatched(mesh)
    with jax.set_mesh(mesh), pytest.raises(ValueError, match=MISMATCH):
        jax.jit(opt.step).trace(params, state, params)


def test_mismatched_state_is_named_before_an_eager_step_runs():
    mesh = sharded.make_mesh("1d", AxisType.Auto)
    opt, params, state = _mismatched(mesh)
    with pytest.raises(ValueError, match=MISMATCH):
        opt.step(params, state, params)


@pytest.mark.parametrize("implementation", ["pallas", "xla"])
def test_mismatched_state_is_named_when_compiling_under_auto_axes(implementation):
    mesh = sharded.make_mesh("1d", AxisType.Auto)
    opt, params, state = _mismatched(mesh)
    lowered = jax.jit(opt.step).lower(params, state, params)
    # The partitioner settles Auto shardings while compiling; its callback's
    # error reaches the caller wrapped in XLA's.
    with pytest.raises(Exception, match=MISMATCH):
        lowered.compile()


def test_mesh_mixing_explicit_and_auto_axes_is_refused():
    mesh = jax.make_mesh(
        (4, 2), ("data", "model"), axis_types=(AxisType.Explicit, AxisType.Auto)
    )
    opt = pallas_amsgrad.amsgrad(0.1)
    params = {"a": jnp.ones((8, 16))}
    with jax.set_mesh(mesh):
        params = jax.device_put(params, NamedSharding(mesh, P("data")))
        state = opt.init(params)
        with pytest.raises(ValueError, match="mixes Explicit and Auto axes"):
            jax.jit(opt.step).trace(params, state, params)


def _users_shard_map(opt, state, check_vma, mesh=None):
    spec = {"a": P("data"), "b": P("data"), "r": P()}
    state_specs = (
        state[0]._replace(count=P(), mu=spec, nu=spec, nu_max=spec),
        state[1],
    )
    return jax.jit(
        jax.shard_map(
            opt.step,
            mesh=mesh or sharded.make_mesh("1d", AxisType.Auto),
            in_specs=(spec, state_specs, spec),
            out_specs=(spec, state_specs),
            check_vma=check_vma,
        )
    )


SHARD_MAP_PARAMS = {
    "a": np.arange(64.0, dtype=np.float32).reshape(8, 8),
    "b": np.ones((16, 128), jnp.bfloat16),
    "r": np.linspace(-1, 1, 3, dtype=np.float32),  # Replicated.
}


@pytest.mark.parametrize(
    ("implementation", "check_vma"),
    [("xla", True), ("pallas", False)],
    ids=["xla-check_vma", "pallas-no_check_vma"],
)
def test_step_inside_a_users_shard_map_runs_on_the_local_shards(
    implementation, check_vma
):
    """Inside the caller's own shard_map the step sees local shards only (the
    partitioner is not involved). Pallas' generic interpreter (the CPU kernel)
    fails jax's check_vma on its own grid indexing, so it runs unchecked."""
    opt = pallas_amsgrad.amsgrad(0.1, implementation=implementation)
    params = SHARD_MAP_PARAMS
    grads = jax.tree.map(lambda p: (p * 0.5).astype(p.dtype), params)
    state = opt.init(params)
    expected, _ = jax.jit(opt.step)(grads, state, params)
    new_params, _ = _users_shard_map(opt, state, check_vma)(grads, state, params)
    for name in params:
        np.testing.assert_array_equal(
            np.asarray(new_params[name]), np.asarray(expected[name]), err_msg=name
        )


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_compiled_kernels_declare_how_they_vary_inside_a_users_shard_map(platform):
    """With check_vma=True (shard_map's default) a kernel's outputs must say
    which mesh axes they vary over; the TPU and GPU kernels do, so the step
    lowers there."""
    opt = pallas_amsgrad.amsgrad(0.1, implementation="pallas")
    state = opt.init(SHARD_MAP_PARAMS)
    mesh = exporting.mesh_for(sharded.make_mesh("1d", AxisType.Auto), platform)
    with exporting.using(mesh):
        exported = jax.export.export(
            _users_shard_map(opt, state, check_vma=True, mesh=mesh),
            platforms=[platform],
        )(SHARD_MAP_PARAMS, state, SHARD_MAP_PARAMS)
    custom_call = {"tpu": "tpu_custom_call", "cuda": "mosaic_gpu_v2"}[platform]
    assert custom_call in exported.mlir_module()


def test_gspmd_partitioner_is_refused_under_auto_axes():
    mesh = sharded.make_mesh("1d", AxisType.Auto)
    opt = pallas_amsgrad.amsgrad(0.1)
    params = jax.device_put({"a": jnp.ones((8, 16))}, NamedSharding(mesh, P("data")))
    state = opt.init(params)
    jax.config.update("jax_use_shardy_partitioner", False)
    try:
        with pytest.raises(ValueError, match="needs jax's default Shardy partitioner"):
            jax.jit(opt.step).trace(params, state, params)
    finally:
        jax.config.update("jax_use_shardy_partitioner", True)


def test_init_on_abstract_params_given_partition_specs_under_set_mesh():
    mesh = sharded.make_mesh("1d", AxisType.Explicit)
    with jax.set_mesh(mesh):
        abstract = {"a": jax.ShapeDtypeStruct((16, 4), jnp.float32, sharding=P("data"))}
        state = pallas_amsgrad.amsgrad(0.1).init(abstract)
        with pytest.raises(ValueError, match=r"params\['odd'\] has shape \(6, 4\)"):
            pallas_amsgrad.amsgrad(0.1).init(
                {"odd": jax.ShapeDtypeStruct((6, 4), jnp.float32, sharding=P("data"))}
            )
    assert state[0].mu["a"].sharding.is_equivalent_to(NamedSharding(mesh, P("data")), 2)
    assert state[0].count.sharding.is_equivalent_to(NamedSharding(mesh, P()), 0)
