"""The AMSGrad update of one block, and the operands every implementation takes.

Every implementation (the Pallas kernels and the XLA path) runs
`amsgrad_block` on the same `Coefficients`, so they cannot drift apart; the
spec (`amsgrad_spec`) is written independently and judges them all. `Operands`
is the one statement of the order in which a leaf's arrays reach them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class Coefficients(NamedTuple):
    """The runtime scalars of one step, in the compute dtype.

    They are data, not constants baked into the program, so schedules and
    `optax.inject_hyperparams` never recompile. `1 - b` is passed beside `b`
    because optax computes it in the hyperparameter's own precision (a Python
    float's `1 - 0.999` is exact in float64, then rounded), which a kernel
    recomputing it in float32 would not reproduce.
    """

    step_size: jax.Array  # -learning_rate, or 1 for scale_by_amsgrad.
    one_minus_b1: jax.Array
    b1: jax.Array
    one_minus_b2: jax.Array
    b2: jax.Array
    eps: jax.Array
    eps_root: jax.Array
    # 1 / (1 - b**t), or exactly 1 when disabled. A multiply by the reciprocal,
    # computed once per step, rather than a divide per element: XLA rewrites
    # `x / broadcast(c)` into exactly this in some graphs and not in others,
    # and the kernel must give the same bits for a leaf wherever it sits.
    inverse_bias_correction_mu: jax.Array
    inverse_bias_correction_nu: jax.Array

    def pack(self, dtype: Any) -> jax.Array:
        """The coefficients as one 1-D array of `dtype` (SMEM on TPU)."""
        return jnp.stack([jnp.asarray(c).astype(dtype) for c in self])

    @classmethod
    def unpack(cls, packed: Any) -> Coefficients:
        """From a `pack`ed array or a ref to one: each scalar read by index."""
        return cls(*(packed[i] for i in range(len(cls._fields))))


def amsgrad_block(
    grad: jax.Array,
    mu: jax.Array,
    nu: jax.Array,
    nu_max: jax.Array,
    c: Coefficients,
    sqrt: Callable[[jax.Array], jax.Array] = jnp.sqrt,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """One AMSGrad step on arrays already in the compute dtype.

    Equivalent to the following JAX code:

        mu = (1 - b1) * g + b1 * mu
        nu = (1 - b2) * |g|**2 + b2 * nu
        nu_max = maximum(nu_max, nu * (1 / bc_nu))
        update = step_size * ((mu * (1 / bc_mu)) / (sqrt(nu_max + eps_root) + eps))

    Returns (update, mu, nu, nu_max), unrounded.
    """
    mu = c.one_minus_b1 * grad + c.b1 * mu
    nu = c.one_minus_b2 * squared_magnitude(grad) + c.b2 * nu
    nu_max = jnp.maximum(nu_max, nu * c.inverse_bias_correction_nu)
    mu_hat = mu * c.inverse_bias_correction_mu
    direction = mu_hat / (sqrt(nu_max + c.eps_root) + c.eps)
    return c.step_size * direction, mu, nu, nu_max


def squared_magnitude(x: jax.Array) -> jax.Array:
    """|x|^2 elementwise: x * x, or (conj(x) * x).real for complex x, as
    optax's `abs_sq` (real, so a complex leaf's nu has no imaginary part)."""
    if jnp.iscomplexobj(x):
        return (x.conj() * x).real
    return x * x


def sqrt_via_rsqrt(x: jax.Array) -> jax.Array:
    """sqrt for Mosaic GPU, which lowers rsqrt but not sqrt (jax 0.10).

    1 / rsqrt(x) keeps sqrt's special values: 0 -> 0, inf -> inf, NaN -> NaN.
    """
    return 1.0 / jax.lax.rsqrt(x)


# Each input that is written back, and the output position it becomes.
_WRITTEN = {"param": 0, "mu": 1, "nu": 2, "nu_max": 3}
# The pytree each operand comes from, to name a leaf in errors.
_TREES = {
    "param": "params",
    "grad": "grads",
    "mu": "state.mu",
    "nu": "state.nu",
    "nu_max": "state.nu_max",
}


@dataclasses.dataclass(frozen=True)
class Operands:
    """One leaf's arrays, in the order every implementation takes them.

    Inputs are `([param,] grad, mu, nu, nu_max)` and outputs
    `(param | update, mu, nu, nu_max)`: `step` passes the param and gets it
    back updated; `update` passes none and gets the update itself.
    """

    apply_to_params: bool

    @property
    def inputs(self) -> tuple[str, ...]:
        param = ("param",) if self.apply_to_params else ()
        return (*param, "grad", "mu", "nu", "nu_max")

    @property
    def tree_names(self) -> tuple[str, ...]:
        """The pytree of each input, e.g. "state.mu", for error messages."""
        return tuple(_TREES[name] for name in self.inputs)

    @property
    def grad_index(self) -> int:
        return self.inputs.index("grad")

    @property
    def reference_index(self) -> int:
        """The input whose layout a leaf's outputs take: param, else mu."""
        return 0 if self.apply_to_params else self.inputs.index("mu")

    def written_back(self) -> dict[int, int]:
        """{input position: output position} of every input the step replaces
        (all but grad, which is only read)."""
        return {
            k: _WRITTEN[name] for k, name in enumerate(self.inputs) if name in _WRITTEN
        }

    def split(self, leaf: Sequence[Any]) -> tuple[Any, Any, Any, Any, Any]:
        """(param or None, grad, mu, nu, nu_max) of one leaf's inputs."""
        if self.apply_to_params:
            return tuple(leaf)
        return (None, *leaf)


STEP = Operands(apply_to_params=True)
UPDATE = Operands(apply_to_params=False)
