"""The AMSGrad oracle: plain jax.numpy, mirroring optax.amsgrad (optax 0.2.8)."""

from .amsgrad import (
    AmsgradState,
    Hyperparams,
    apply,
    bias_correction,
    compute_dtype,
    debias,
    direction,
    first_moment,
    increment_count,
    init,
    running_max,
    second_moment,
    step,
    update,
)

__all__ = [
    "AmsgradState",
    "Hyperparams",
    "apply",
    "bias_correction",
    "compute_dtype",
    "debias",
    "direction",
    "first_moment",
    "increment_count",
    "init",
    "running_max",
    "second_moment",
    "step",
    "update",
]
