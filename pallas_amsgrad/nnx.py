"""flax's `nnx.Optimizer`, with the update applied in the kernel's pass.

`nnx.Optimizer.update` always runs `tx.update` and then `optax.apply_updates`
(a second pass over params and updates). This subclass runs the fused `step`
of a `pallas_amsgrad.amsgrad` transformation instead, with the same state:
a model and optimizer can move between `nnx.Optimizer(model, tx, ...)` and
this class either way. Needs flax (`pip install pallas-amsgrad[flax]`).
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from pallas_amsgrad._transform import GradientTransformationWithStep


class Optimizer(nnx.Optimizer):
    """`nnx.Optimizer` whose `update` is one fused step.

    Jit the training step with `nnx.jit(..., donate_argnums=...)` over the
    model and the optimizer for the params and state to be updated in place.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import pallas_amsgrad
      >>> from pallas_amsgrad.nnx import Optimizer
      >>> model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
      >>> optimizer = Optimizer(model, pallas_amsgrad.amsgrad(1e-3), wrt=nnx.Param)
      >>> loss = lambda m: (m(jnp.ones((1, 2))) ** 2).mean()
      >>> optimizer.update(model, nnx.grad(loss)(model))
      >>> int(optimizer.step[...])
      1
    """

    def __init__(self, model: Any, tx: GradientTransformationWithStep, **kwargs):
        if not isinstance(tx, GradientTransformationWithStep):
            raise TypeError(
                f"tx={tx!r} has no fused step; use pallas_amsgrad.amsgrad(...), "
                "or flax's own nnx.Optimizer for other transformations"
            )
        super().__init__(model, tx, **kwargs)

    def update(self, model: Any, grads: Any, /, **kwargs: Any) -> None:
        """Applies one step to `model`'s params and the optimizer state in
        the kernel's single pass. Unlike `nnx.Optimizer.update` it returns
        nothing: the updates are never formed on their own."""
        if kwargs:
            raise TypeError(
                f"the fused step takes no extra arguments, got {sorted(kwargs)}"
            )
        params = nnx.as_pure(nnx.state(model, self.wrt, graph=self.graph))
        grads = nnx.as_pure(nnx.state(grads, self.wrt, graph=self.graph))
        new_params, new_opt_state = self.tx.step(
            grads, nnx.as_pure(self.opt_state), params
        )
        nnx.update(model, new_params)
        nnx.update(self.opt_state, nnx.state(new_opt_state, graph=self.graph))
        self.step[...] += 1
