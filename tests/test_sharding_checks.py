"""The per-leaf sharding checks, as plain functions on abstract meshes.

The sharded step itself runs in tests/multidevice/ (8 devices); these pin the
rules it enforces, on shardings that need no devices.
"""

from __future__ import annotations

import pytest
from jax.sharding import AbstractMesh, AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from pallas_amsgrad import _math, _sharding

MESH = AbstractMesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
OTHER_MESH = AbstractMesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)


def named(*spec, mesh=MESH):
    return NamedSharding(mesh, P(*spec))


@pytest.mark.parametrize(
    ("shape", "spec"),
    [
        ((8, 6), ("data", None)),
        ((8, 6), ("data", "model")),
        ((16,), (("data", "model"),)),  # Two axes, one dim: 8 shards.
        ((3, 5), ()),  # Replicated: any shape.
        ((), ()),
    ],
)
def test_even_splits_pass(shape, spec):
    _sharding.check_splits("params['w']", shape, named(*spec))


@pytest.mark.parametrize(
    ("shape", "spec", "message"),
    [
        (
            (6, 4),
            ("data",),
            r"its dim 0 \(6\) cannot be split over mesh axes \('data',\) \(4 shards",
        ),
        (
            (8, 3),
            (None, "model"),
            r"its dim 1 \(3\) cannot be split over mesh axes \('model',\) \(2 shards",
        ),
        (
            (12,),
            (("data", "model"),),
            r"its dim 0 \(12\) cannot be split over mesh axes \('data', 'model'\) \(8 shards",
        ),
        (
            (8,),
            ("data", "model"),
            r"has shape \(8,\) but is sharded as .* which names 2 dims",
        ),
    ],
)
def test_uneven_splits_name_the_leaf_and_dim(shape, spec, message):
    with pytest.raises(ValueError, match=r"params\['w'\] .*" + message):
        _sharding.check_splits("params['w']", shape, named(*spec))


def test_a_leaf_sharded_alike_returns_the_params_sharding():
    params = named("data", None)
    shardings = [params, named("model"), named("data"), params, named("data", None)]
    # Trailing Nones do not matter; the grads (second) may differ.
    assert _sharding.check_leaf("['w']", _math.STEP, (8, 4), shardings) is params


def test_update_takes_mu_as_the_reference_and_unknowns_are_skipped():
    mu = named("data")
    shardings = [None, mu, None, mu]  # grads, mu, nu, nu_max
    assert _sharding.check_leaf("['w']", _math.UPDATE, (8,), shardings) is mu
    assert _sharding.check_leaf("['w']", _math.UPDATE, (8,), [None] * 4) is None


@pytest.mark.parametrize(
    ("state_sharding", "shown"),
    [
        (named(None, "data"), r"P\(None, 'data'\) over mesh \{'data': 4, 'model': 2\}"),
        (
            named("data", None, mesh=OTHER_MESH),
            r"P\('data', None\) over mesh \{'data': 2, 'model': 4\}",
        ),
    ],
    ids=["other-spec", "other-mesh"],
)
def test_state_sharded_unlike_its_param_is_named(state_sharding, shown):
    params = named("data")
    shardings = [params, params, params, state_sharding, params]
    with pytest.raises(
        ValueError,
        match=r"state\.nu\['w'\] is sharded as "
        + shown
        + r" but params\['w'\] as P\('data', None\)",
    ):
        _sharding.check_leaf("['w']", _math.STEP, (8, 4), shardings)


def test_the_reference_must_split_evenly():
    params = named("data")
    with pytest.raises(ValueError, match=r"params\['w'\] has shape \(6, 4\)"):
        _sharding.check_leaf(
            "['w']",
            _math.STEP,
            (6, 4),
            [params, None, params, params, params],
        )
