"""One process of tests/test_multidevice.py's two-process run.

Run as a script, it joins the other process through `jax.distributed` on the
loopback address, trains a few steps on one global (4, 2) mesh of both
processes' devices, checks that the compiled step has no collectives, and
saves the shards it holds. Imported, it gives the parent the same training
run on one device and puts the saved shards back together.
"""

from __future__ import annotations

import argparse
import re

import jax
import jax.numpy as jnp
import leaf_tables
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import pallas_amsgrad

PROCESSES = 2
LOCAL_DEVICES = 4
MESH_SHAPE, MESH_AXES = (4, 2), ("data", "model")
STEPS = 3
# (shape, dtype, spec): replicated, one-axis and two-axis leaves; two dtypes.
LEAVES = {
    "embed": ((32, 256), jnp.float32, P("data", "model")),
    "w": ((16, 128), jnp.bfloat16, P(None, "model")),
    "b": ((128,), jnp.float32, P("data")),
    "norm": ((128,), jnp.float32, P()),
}
COLLECTIVES = re.compile(
    r"\b(all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)"
    r"(-start)?\("
)


def values(seed):
    return leaf_tables.host_values(LEAVES, seed)


def train(implementation: str, devices) -> tuple:
    """(params, state) after `STEPS` donated steps on `devices` (1 or 8)."""
    opt = pallas_amsgrad.amsgrad(
        0.01, b1=0.9, b2=0.99, eps=1e-6, implementation=implementation
    )
    step = jax.jit(lambda p, s, g: opt.step(g, s, p), donate_argnums=(0, 1))
    if len(devices) == 1:
        params = jax.device_put(values(0), devices[0])
        state = opt.init(params)
        for i in range(STEPS):
            params, state = step(params, state, values(1 + i))
        return params, state

    mesh = jax.sharding.Mesh(np.array(devices).reshape(MESH_SHAPE), MESH_AXES)
    shardings = jax.tree.map(
        lambda leaf: NamedSharding(mesh, leaf[2]), LEAVES, is_leaf=leaf_tables.is_leaf
    )

    def global_arrays(tree):
        # Each process builds only the shards its own devices hold.
        return jax.tree.map(
            lambda x, s: jax.make_array_from_callback(x.shape, s, x.__getitem__),
            tree,
            shardings,
        )

    params = global_arrays(values(0))
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
        params,
    )
    state = opt.init(abstract)
    for i in range(STEPS):
        grads = global_arrays(values(1 + i))
        if i == 0:
            compiled = step.lower(params, state, grads).compile().as_text()
            assert not COLLECTIVES.findall(compiled), COLLECTIVES.findall(compiled)
        params, state = step(params, state, grads)
    return params, state


def _key(leaf_index: int, index: tuple[slice, ...], shape) -> str:
    bounds = ",".join(
        f"{s.start or 0}:{size if s.stop is None else s.stop}"
        for s, size in zip(index, shape, strict=True)
    )
    return f"{leaf_index}|{bounds}"


def save(outputs, path) -> None:
    """This process's shards of every output leaf, as raw bytes by position."""
    shards = {}
    for leaf_index, leaf in enumerate(jax.tree.leaves(outputs)):
        for shard in leaf.addressable_shards:
            data = np.asarray(shard.data).reshape(-1).view(np.uint8)
            shards[_key(leaf_index, shard.index, leaf.shape)] = data
    np.savez(path, **shards)


def assemble(like, saved) -> tuple:
    """The whole outputs from every process's `save`d shards, shaped as `like`."""
    leaves, treedef = jax.tree.flatten(like)
    whole = [np.zeros(leaf.shape, leaf.dtype) for leaf in leaves]
    covered = [np.zeros(leaf.shape, bool) for leaf in leaves]
    for shards in saved:
        for key in shards.files:
            leaf_index, bounds = key.split("|")
            leaf = whole[int(leaf_index)]
            index = tuple(
                slice(*map(int, b.split(":"))) for b in bounds.split(",") if b
            )
            data = shards[key].view(leaf.dtype).reshape(leaf[index].shape)
            leaf[index] = data
            covered[int(leaf_index)][index] = True
    assert all(c.all() for c in covered), "some elements were in no shard"
    return jax.tree.unflatten(treedef, whole)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--implementation", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{args.port}",
        num_processes=PROCESSES,
        process_id=args.process_id,
        initialization_timeout=120,
    )
    assert jax.device_count() == PROCESSES * LOCAL_DEVICES, jax.devices()
    assert jax.local_device_count() == LOCAL_DEVICES, jax.local_devices()
    save(train(args.implementation, jax.devices()), args.out)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
