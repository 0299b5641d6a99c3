"""Does narrow optimizer state train like float32? bfloat16 params with
stochastic rounding, and 8-bit block-quantized state.

Trains one small model six ways with this package's fused step and compares
the loss curves:

  float32               float32 params, mu, nu, nu_max (the reference)
  bfloat16 nearest      bfloat16 params and state, rounded to nearest
  bfloat16 stochastic   bfloat16 params and state, rounded stochastically
  float32, 8-bit state  float32 params; mu, nu, nu_max in 8 bits
                        (mu_dtype=int8, nu_dtype=uint8), to the nearest code
  float32, 8-bit stochastic  the same, mu and nu codes rounded
                        stochastically (nu_max always up)
  bfloat16, 8-bit state bfloat16 params and 8-bit state, rounded
                        stochastically (nu_max always up)

The 8-bit runs quantize the two matrices of at least 4096 elements
(32 x 256 and 256 x 256); the 256 x 10 head and the biases keep float32
moments (docs/quantized-state.md).

The task is made here, from a fixed seed: inputs are Gaussian, labels the
argmax of a random two-layer "teacher" network (a tenth of them flipped at
random), and the model a three-layer MLP "student". Every step draws a fresh
batch (the same batches for every configuration), so the model cannot
overfit and the held-out loss measures the optimization alone; the label
noise sets its floor. The learning rate decays
on a cosine to a hundredth of its peak, as in most training runs: late
updates are far below half a bfloat16 spacing of the weights, which rounding
to nearest discards and stochastic rounding keeps on average.

The forward pass computes in float32 from the stored params in every
configuration, so only the optimizer's stores differ. Writes the curves as
JSON and a PNG, and prints the final losses and their gaps to float32:

    python benchmarks/train_stochastic_rounding.py --out benchmarks/results/NAME
"""

from __future__ import annotations

import argparse
import itertools
import json
import pathlib
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import pallas_amsgrad
from pallas_amsgrad.tools import environment

FEATURES, TEACHER_HIDDEN, CLASSES = 32, 64, 10
STUDENT_WIDTHS = (FEATURES, 256, 256, CLASSES)
HELD_OUT = 8192
LABEL_NOISE = 0.1
CONFIGURATIONS = {
    "float32": dict(dtype=jnp.float32, mu=None, nu=None, stochastic=False),
    "bfloat16 nearest": dict(
        dtype=jnp.bfloat16, mu=jnp.bfloat16, nu=jnp.bfloat16, stochastic=False
    ),
    "bfloat16 stochastic": dict(
        dtype=jnp.bfloat16, mu=jnp.bfloat16, nu=jnp.bfloat16, stochastic=True
    ),
    "float32, 8-bit state": dict(
        dtype=jnp.float32, mu=jnp.int8, nu=jnp.uint8, stochastic=False
    ),
    "float32, 8-bit stochastic": dict(
        dtype=jnp.float32, mu=jnp.int8, nu=jnp.uint8, stochastic=True
    ),
    "bfloat16, 8-bit state": dict(
        dtype=jnp.bfloat16, mu=jnp.int8, nu=jnp.uint8, stochastic=True
    ),
}


class Teacher:
    """The task: a random two-layer network labels Gaussian inputs."""

    def __init__(self, seed: int):
        rng = np.random.default_rng(seed)
        self.w1 = rng.normal(0, 1 / np.sqrt(FEATURES), (FEATURES, TEACHER_HIDDEN))
        self.w2 = rng.normal(0, 1 / np.sqrt(TEACHER_HIDDEN), (TEACHER_HIDDEN, CLASSES))

    def sample(self, rng, n: int):
        """(inputs, labels) of n fresh examples, a tenth of the labels random."""
        x = rng.normal(size=(n, FEATURES)).astype(np.float32)
        labels = np.argmax(np.tanh(x @ self.w1) @ self.w2, axis=1)
        flipped = rng.random(n) < LABEL_NOISE
        labels[flipped] = rng.integers(0, CLASSES, flipped.sum())
        return jnp.asarray(x), jnp.asarray(labels)


def init_student(seed: int, dtype) -> dict:
    keys = jax.random.split(jax.random.key(seed), len(STUDENT_WIDTHS) - 1)
    params = {}
    for i, (key, (fan_in, fan_out)) in enumerate(
        zip(keys, itertools.pairwise(STUDENT_WIDTHS), strict=True)
    ):
        w = jax.random.normal(key, (fan_in, fan_out)) * np.sqrt(2 / fan_in)
        params[f"layer{i}"] = {"w": w.astype(dtype), "b": jnp.zeros(fan_out, dtype)}
    return params


def loss(params, x, labels):
    """Mean cross-entropy, computed in float32 from params of any dtype."""
    h = x
    layers = [params[f"layer{i}"] for i in range(len(params))]
    for i, layer in enumerate(layers):
        h = h @ layer["w"].astype(jnp.float32) + layer["b"].astype(jnp.float32)
        if i < len(layers) - 1:
            h = jax.nn.relu(h)
    logp = jax.nn.log_softmax(h)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))


def train(name, config, teacher, args):
    x_held, labels_held = teacher.sample(np.random.default_rng(args.seed + 1), HELD_OUT)
    schedule = cosine_schedule(args.learning_rate, args.steps)
    opt = pallas_amsgrad.amsgrad(
        schedule,
        mu_dtype=config["mu"],
        nu_dtype=config["nu"],
        stochastic_rounding=config["stochastic"],
        seed=args.seed,
    )
    params = init_student(args.seed, config["dtype"])
    state = opt.init(params)

    @jax.jit
    def step(params, state, x, labels):
        value, grads = jax.value_and_grad(loss)(params, x, labels)
        params, state = opt.step(grads, state, params)
        return params, state, value

    held_out = jax.jit(loss)
    rng = np.random.default_rng(args.seed + 2)
    curve, held_curve, window = [], [], []
    start = time.perf_counter()
    for i in range(args.steps):
        params, state, value = step(params, state, *teacher.sample(rng, args.batch))
        window.append(value)
        if (i + 1) % args.every == 0:
            curve.append((i + 1, float(np.mean(jax.device_get(window)))))
            window = []
        if (i + 1) % args.held_out_every == 0 or i + 1 == args.steps:
            held_curve.append((i + 1, float(held_out(params, x_held, labels_held))))
    seconds = time.perf_counter() - start
    print(
        f"{name:26s} train {curve[-1][1]:.4f}  held-out {held_curve[-1][1]:.4f}  "
        f"({seconds:.1f} s)",
        flush=True,
    )
    return {"train": curve, "held_out": held_curve, "seconds": seconds}


def cosine_schedule(peak, steps):
    """Cosine decay from `peak` to `peak / 100`."""
    return optax.cosine_decay_schedule(peak, steps, alpha=0.01)


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, result in results["runs"].items():
        for ax, key in zip(axes, ("train", "held_out"), strict=True):
            steps, values = zip(*result[key], strict=True)
            ax.plot(steps, values, label=name)
    for ax, title in zip(
        axes, ("train loss (window mean)", "held-out loss"), strict=True
    ):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(
        "AMSGrad: bfloat16 params and state, to nearest vs stochastic; 8-bit "
        f"state ({results['environment']['backend']})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--held-out-every", type=int, default=250)
    parser.add_argument(
        "--out", required=True, help="path prefix: writes PREFIX.json, PREFIX.png"
    )
    args = parser.parse_args(argv)
    teacher = Teacher(args.seed)
    results = {
        "environment": environment.environment(),
        "python": platform.python_version(),
        "arguments": vars(args),
        "task": {
            "features": FEATURES,
            "classes": CLASSES,
            "held_out": HELD_OUT,
            "label_noise": LABEL_NOISE,
            "student_widths": STUDENT_WIDTHS,
        },
        "runs": {
            name: train(name, config, teacher, args)
            for name, config in CONFIGURATIONS.items()
        },
    }
    final = {name: run["held_out"][-1][1] for name, run in results["runs"].items()}
    results["held_out_gap_to_float32"] = {
        name: value - final["float32"] for name, value in final.items()
    }
    for name, gap in results["held_out_gap_to_float32"].items():
        print(f"{name:26s} held-out loss - float32's: {gap:+.4f}")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
