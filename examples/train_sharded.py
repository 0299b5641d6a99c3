"""Train a small MLP on a device mesh with pallas_amsgrad, beside optax.amsgrad.

    python examples/train_sharded.py [--steps 20] [--explicit] [--implementation pallas]

Uses every device of the default backend on a 2-D ("data", "model") mesh, fully
sharded data parallel: the batch is split over "data", and the weights, their
gradients and optimizer state over both axes (a weight matrix's rows over one,
its columns over the other); weights are gathered whole only for the matmuls. On a machine without
accelerators it simulates 8 CPU devices. Each step prints the loss of the
fused step and of optax's `update` + `apply_updates` from the same start; they
agree to float32 rounding. The optimizer state is created straight into its
shards, and the fused step updates every device's shards in place.
"""

from __future__ import annotations

import os

# Only the CPU backend reads this; on a TPU or GPU host the real devices are used.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    )

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import pallas_amsgrad

FEATURES, HIDDEN, BATCH = 64, 512, 256
# Each weight's sharding: rows over one mesh axis, columns over the other.
PARAM_SPECS = {
    "layer1": {"w": P("data", "model"), "b": P("model")},
    "layer2": {"w": P("model", "data"), "b": P("data")},
    "out": {"w": P("data", None), "b": P()},
}


def make_mesh(explicit: bool) -> jax.sharding.Mesh:
    devices = jax.device_count()
    model = 2 if devices % 2 == 0 and devices > 1 else 1
    kind = AxisType.Explicit if explicit else AxisType.Auto
    return jax.make_mesh((devices // model, model), ("data", "model"), (kind, kind))


def init_params(key) -> dict:
    k1, k2, k3 = jax.random.split(key, 3)

    def dense(k, n_in, n_out):
        return {
            "w": jax.random.normal(k, (n_in, n_out)) / np.sqrt(n_in),
            "b": jnp.zeros((n_out,)),
        }

    return {
        "layer1": dense(k1, FEATURES, HIDDEN),
        "layer2": dense(k2, HIDDEN, HIDDEN),
        "out": dense(k3, HIDDEN, 1),
    }


def loss_fn(params, batch):
    # Fully sharded data parallel: weights live in shards (and so do their
    # optimizer state and update) and are gathered whole for the matmuls.
    params = jax.tree.map(lambda p: jax.sharding.reshard(p, P()), params)
    x, y = batch
    for name in ("layer1", "layer2"):
        x = jax.nn.gelu(x @ params[name]["w"] + params[name]["b"])
    prediction = (x @ params["out"]["w"] + params["out"]["b"])[:, 0]
    return jnp.mean((prediction - y) ** 2)


def synthetic_batches(steps: int):
    """A fixed random teacher network's outputs on random inputs."""
    rng = np.random.default_rng(0)
    teacher = rng.normal(size=(FEATURES,)) / np.sqrt(FEATURES)
    for _ in range(steps):
        x = rng.normal(size=(BATCH, FEATURES)).astype(np.float32)
        yield x, np.sin(3 * x @ teacher).astype(np.float32)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument(
        "--explicit", action="store_true", help="a mesh of Explicit axes"
    )
    parser.add_argument(
        "--implementation",
        choices=["pallas", "xla"],
        default=None,
        help="default: pallas on TPU/GPU, xla on CPU",
    )
    args = parser.parse_args()

    mesh = make_mesh(args.explicit)
    param_shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), PARAM_SPECS)
    batch_sharding = (NamedSharding(mesh, P("data")),) * 2
    print(
        f"{jax.device_count()} {jax.devices()[0].platform} devices, mesh "
        f"{dict(mesh.shape)} ({'Explicit' if args.explicit else 'Auto'} axes)"
    )

    fused = pallas_amsgrad.amsgrad(
        args.learning_rate, implementation=args.implementation
    )
    reference = optax.amsgrad(args.learning_rate)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def fused_step(params, state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        params, state = fused.step(grads, state, params)
        return params, state, loss

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def optax_step(params, state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, state = reference.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    with jax.set_mesh(mesh):
        params = jax.device_put(init_params(jax.random.key(0)), param_shardings)
        optax_params = jax.tree.map(jnp.copy, params)
        # Straight into shards: each device creates only its own zeros.
        state = fused.init(
            jax.tree.map(
                lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=p.sharding),
                params,
            )
        )
        optax_state = reference.init(optax_params)

        print(f"{'step':>4}  {'pallas_amsgrad':>14}  {'optax':>14}")
        start = time.perf_counter()
        for step, batch in enumerate(synthetic_batches(args.steps)):
            batch = jax.device_put(batch, batch_sharding)
            params, state, loss = fused_step(params, state, batch)
            optax_params, optax_state, optax_loss = optax_step(
                optax_params, optax_state, batch
            )
            print(f"{step:>4}  {float(loss):>14.6f}  {float(optax_loss):>14.6f}")
        elapsed = time.perf_counter() - start

    kept = all(
        p.sharding.is_equivalent_to(s, p.ndim)
        for p, s in zip(
            jax.tree.leaves(params), jax.tree.leaves(param_shardings), strict=True
        )
    )
    gap = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(
            jax.tree.leaves(params), jax.tree.leaves(optax_params), strict=True
        )
    )
    print(
        f"{args.steps} steps in {elapsed:.1f} s (with compilation); params keep "
        f"their shardings: {kept}; largest param difference from optax: {gap:.2e}"
    )


if __name__ == "__main__":
    main()
