"""The AMSGrad step of one block, and the operands every implementation takes.

Every implementation (the Pallas kernels and the XLA path) runs `step_block`
on the same `Coefficients`, so they cannot drift apart; the spec
(`amsgrad_spec`) is written independently and judges them all. `Operands` is
the one statement of the order in which a leaf's arrays reach them, and of
the optional terms (clipping, weight decay, skips) a group's step has.
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
    # The recipe's terms (`Terms`); neutral values where a term is off.
    # min(1, max_grad_norm / global_norm), as clip_by_global_norm scales.
    grad_scale: jax.Array = 1
    weight_decay: jax.Array = 0
    accept: jax.Array = 1  # 0 when the finite guard skips the step.

    def pack(self, dtype: Any) -> jax.Array:
        """The coefficients as one 1-D array of `dtype` (SMEM on TPU)."""
        return jnp.stack([jnp.asarray(c).astype(dtype) for c in self])

    @classmethod
    def unpack(cls, packed: Any) -> Coefficients:
        """From a `pack`ed array or a ref to one: each scalar read by index."""
        return cls(*(packed[i] for i in range(len(cls._fields))))


@dataclasses.dataclass(frozen=True)
class Terms:
    """The optional terms of a group's step (static: each changes the program).

    Attributes:
      clip: gradients scaled by `grad_scale` before the moments.
      decay: `weight_decay * param` added to the direction (the param is read,
        in `update` too).
      skip: where `accept` is 0 the step changes nothing: zero updates (or the
        param as it was) and the moments as they were.
    """

    clip: bool = False
    decay: bool = False
    skip: bool = False


def amsgrad_block(
    grad: jax.Array,
    mu: jax.Array,
    nu: jax.Array,
    nu_max: jax.Array,
    c: Coefficients,
    sqrt: Callable[[jax.Array], jax.Array] = jnp.sqrt,
    *,
    param: jax.Array | None = None,
    terms: Terms = Terms(),
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """One AMSGrad step on arrays already in the compute dtype.

    Equivalent to the following JAX code:

        g = grad_scale * g                                  # terms.clip
        mu = (1 - b1) * g + b1 * mu
        nu = (1 - b2) * |g|**2 + b2 * nu
        nu_max = maximum(nu_max, nu * (1 / bc_nu))
        d = (mu * (1 / bc_mu)) / (sqrt(nu_max + eps_root) + eps)
        d = d + weight_decay * param                        # terms.decay
        update = step_size * d

    Returns (update, mu, nu, nu_max), unrounded; `terms.skip` is the caller's
    (`step_block`).
    """
    if terms.clip:
        grad = c.grad_scale * grad
    mu = c.one_minus_b1 * grad + c.b1 * mu
    nu = c.one_minus_b2 * squared_magnitude(grad) + c.b2 * nu
    nu_max = jnp.maximum(nu_max, nu * c.inverse_bias_correction_nu)
    mu_hat = mu * c.inverse_bias_correction_mu
    direction = mu_hat / (sqrt(nu_max + c.eps_root) + c.eps)
    if terms.decay:
        direction = direction + c.weight_decay * param
    return c.step_size * direction, mu, nu, nu_max


def step_block(
    inputs: Sequence[jax.Array],
    c: Coefficients,
    operands: Operands,
    sqrt: Callable[[jax.Array], jax.Array] = jnp.sqrt,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """A leaf's (block's) outputs in `operands` order, from its inputs in
    `operands` order, each in its `read_dtype`, unrounded: the new param (or
    the update), mu, nu, nu_max."""
    param, grad, mu, nu, nu_max = operands.split(inputs)
    terms = operands.terms
    update, *moments = amsgrad_block(
        grad, mu, nu, nu_max, c, sqrt, param=param, terms=terms
    )
    first = param + update if operands.apply_to_params else update
    if not terms.skip:
        return (first, *moments)
    accept = c.accept != 0
    unchanged = (
        param if operands.apply_to_params else jnp.zeros_like(update),
        mu,
        nu,
        nu_max,
    )
    return tuple(
        jnp.where(accept, new, old)
        for new, old in zip((first, *moments), unchanged, strict=True)
    )


def read_dtype(name: str, stored: Any, compute: Any) -> Any:
    """The dtype `step_block` takes input `name` (stored in `stored`) in: the
    compute dtype, but a param wider than it in its own (float64 params of
    float32 gradients and moments), so that `step` computes the moments as
    `update` does and adds the update to the param in the param's dtype, as
    `optax.apply_updates` adds it."""
    return jnp.promote_types(stored, compute) if name == "param" else compute


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


_MOMENTS = ("mu", "nu", "nu_max")
# The pytree each operand comes from, to name a leaf in errors.
_TREES = {
    "param": "params",
    "grad": "grads",
    "mu": "state.mu",
    "nu": "state.nu",
    "nu_max": "state.nu_max",
    "mu_scales": "state.mu",
    "nu_scales": "state.nu",
    "nu_max_scales": "state.nu_max",
}


@dataclasses.dataclass(frozen=True)
class Operands:
    """One leaf's arrays, in the order every implementation takes them.

    Inputs are `([param,] grad, mu, nu, nu_max)` and outputs
    `(param | update, mu, nu, nu_max)`: `step` passes the param and gets it
    back updated; `update` gets the update itself, and passes the param only
    to read it (weight decay). A quantized moment is two arrays in its
    place, its codes and then its scales (`_quantization`).
    """

    apply_to_params: bool
    terms: Terms = Terms()
    # Per output (param | update, mu, nu, nu_max), whether it is rounded
    # stochastically (`_rounding`): the 16-bit and 8-bit moments a step
    # stores, and a 16-bit param, when the optimizer asks for it.
    stochastic: tuple[bool, bool, bool, bool] = (False, False, False, False)
    # Per moment (mu, nu, nu_max), whether it is stored block-quantized, in
    # blocks of `block` elements along the leaf's last dimension.
    quantized: tuple[bool, bool, bool] = (False, False, False)
    block: int = 256

    @property
    def quantizes(self) -> bool:
        return any(self.quantized)

    @property
    def reads_param(self) -> bool:
        """Whether the param is an input: for `step`, or read for decay."""
        return self.apply_to_params or self.terms.decay

    def _moments(self) -> tuple[str, ...]:
        names = []
        for name, quantized in zip(_MOMENTS, self.quantized, strict=True):
            names += [name, f"{name}_scales"] if quantized else [name]
        return tuple(names)

    @property
    def inputs(self) -> tuple[str, ...]:
        param = ("param",) if self.reads_param else ()
        return (*param, "grad", *self._moments())

    @property
    def outputs(self) -> tuple[str, ...]:
        first = "param" if self.apply_to_params else "update"
        return (first, *self._moments())

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
        return 0 if self.reads_param else self.inputs.index("mu")

    def written_back(self) -> dict[int, int]:
        """{input position: output position} of every input the step replaces
        (all but grad, and a param read only for decay)."""
        outputs = self.outputs
        return {
            k: outputs.index(name)
            for k, name in enumerate(self.inputs)
            if name in outputs
        }

    def split(self, leaf: Sequence[Any]) -> tuple[Any, Any, Any, Any, Any]:
        """(param or None, grad, mu, nu, nu_max) of one leaf's inputs (or
        outputs, with the update in the param's place); a quantized moment is
        the pair (codes, scales)."""
        named = dict(zip(self.inputs, leaf, strict=True))
        moments = tuple(
            (named[name], named[f"{name}_scales"]) if quantized else named[name]
            for name, quantized in zip(_MOMENTS, self.quantized, strict=True)
        )
        return (named.get("param"), named["grad"], *moments)

    def join_outputs(self, first: Any, mu: Any, nu: Any, nu_max: Any) -> tuple:
        """The outputs in `outputs` order from the four, a quantized moment
        given as (codes, scales)."""
        joined = [first]
        for moment, quantized in zip((mu, nu, nu_max), self.quantized, strict=True):
            joined += list(moment) if quantized else [moment]
        return tuple(joined)

    def split_outputs(self, outputs: Sequence[Any]) -> tuple[Any, Any, Any, Any]:
        """`join_outputs` undone: (first, mu, nu, nu_max)."""
        named = dict(zip(self.outputs, outputs, strict=True))
        moments = tuple(
            (named[name], named[f"{name}_scales"]) if quantized else named[name]
            for name, quantized in zip(_MOMENTS, self.quantized, strict=True)
        )
        return (outputs[0], *moments)

    def with_terms(self, terms: Terms) -> Operands:
        return dataclasses.replace(self, terms=terms)

    def decoded(self) -> Operands:
        """These operands with every moment as one float array: what
        `step_block` takes once quantized moments are read."""
        return dataclasses.replace(self, quantized=(False, False, False))

    @property
    def rounds_stochastically(self) -> bool:
        return any(self.stochastic)


STEP = Operands(apply_to_params=True)
UPDATE = Operands(apply_to_params=False)
