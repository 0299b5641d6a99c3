"""flax: the fused nnx optimizer trains a real nnx model as nnx.Optimizer
with the optax reference does, with the same state."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import pytest
import tolerances

import amsgrad_spec as spec
import pallas_amsgrad
from pallas_amsgrad.tools import composition

nnx = pytest.importorskip("flax.nnx")
from pallas_amsgrad.nnx import Optimizer  # noqa: E402


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(8, 32, rngs=rngs)
        self.norm = nnx.LayerNorm(32, rngs=rngs)
        self.out = nnx.Linear(32, 2, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.gelu(self.norm(self.hidden(x))))


HP = spec.Hyperparams(
    learning_rate=optax.warmup_cosine_decay_schedule(0.0, 3e-3, 10, 200),
    weight_decay=0.05,
    mask=lambda tree: jax.tree.map(lambda x: x.ndim >= 2, tree),
    max_grad_norm=1.0,
    max_consecutive_errors=3,
)


def _loss(model, x, y):
    return jnp.mean((model(x) - y) ** 2)


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
def test_fused_optimizer_trains_as_nnx_optimizer_with_optax(implementation):
    x = jax.random.normal(jax.random.key(0), (128, 8))
    y = jnp.stack([jnp.sin(x[:, 0]), x[:, 1] * x[:, 2]], axis=1)
    model, ref_model = MLP(nnx.Rngs(1)), MLP(nnx.Rngs(1))
    optimizer = Optimizer(
        model,
        pallas_amsgrad.amsgrad(
            **composition.pallas_kwargs(HP), implementation=implementation
        ),
        wrt=nnx.Param,
    )
    ref_optimizer = nnx.Optimizer(ref_model, composition.optimizer(HP), wrt=nnx.Param)
    tolerances.assert_trees_equal(
        nnx.state(optimizer.opt_state), nnx.state(ref_optimizer.opt_state)
    )

    @nnx.jit(donate_argnums=(0, 1))
    def train_step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(_loss)(model, x, y)
        optimizer.update(model, grads)
        return loss

    @nnx.jit
    def ref_train_step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(_loss)(model, x, y)
        optimizer.update(model, grads)
        return loss

    first = None
    for _ in range(150):
        loss = train_step(model, optimizer, x, y)
        ref_train_step(ref_model, ref_optimizer, x, y)
        first = first if first is not None else float(loss)
    assert float(_loss(model, x, y)) < 0.3 * first
    tolerances.assert_trees_normwise_close(
        nnx.state(model, nnx.Param), nnx.state(ref_model, nnx.Param), "params: "
    )
    tolerances.assert_trees_normwise_close(
        nnx.state(optimizer.opt_state),
        nnx.state(ref_optimizer.opt_state),
        "state: ",
    )
    assert int(optimizer.step[...]) == 150


def test_docstring_example():
    import doctest

    import pallas_amsgrad.nnx

    failures, tried = doctest.testmod(pallas_amsgrad.nnx, verbose=False)
    assert tried > 0 and failures == 0


def test_other_transformations_are_refused():
    with pytest.raises(TypeError, match="has no fused step"):
        Optimizer(MLP(nnx.Rngs(0)), optax.adam(1e-3), wrt=nnx.Param)
