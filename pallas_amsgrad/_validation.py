"""Trace-time checks: bad input raises naming the leaf and the value."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def check_scalar(name: str, value: Any) -> None:
    """A hyperparameter must be a real scalar (Python number or 0-d array)."""
    if isinstance(value, bool) or not (
        isinstance(value, int | float | np.number | np.ndarray | jax.Array)
    ):
        raise TypeError(f"{name}={value!r} must be a scalar number")
    if jnp.ndim(value) != 0:
        raise TypeError(f"{name} must be a scalar, got shape {jnp.shape(value)}")
    dtype = jnp.result_type(value)
    if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
        raise TypeError(f"{name}={value!r} must be a real number, got dtype {dtype}")


def check_learning_rate(learning_rate: Any) -> None:
    if callable(learning_rate):
        return
    try:
        check_scalar("learning_rate", learning_rate)
    except TypeError as error:
        raise TypeError(
            f"{error}, or a schedule (a callable of the step count)"
        ) from None


def canonical_mu_dtype(mu_dtype: Any) -> jnp.dtype | None:
    if mu_dtype is None:
        return None
    try:
        dtype = jax.dtypes.canonicalize_dtype(mu_dtype)
    except TypeError:
        raise TypeError(f"mu_dtype={mu_dtype!r} is not a dtype") from None
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"mu_dtype={mu_dtype!r} must be a floating-point dtype")
    return dtype


def _leaves_like(name: str, tree: Any, treedef) -> list[Any]:
    """The leaves of `tree`, which must have the structure `treedef`."""
    try:
        return treedef.flatten_up_to(tree)
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"{name} does not have the structure of the gradients: {error}"
        ) from None


def check_trees(grads: Any, trees: dict[str, Any]) -> None:
    """Every tree matches `grads` in structure and shapes; all leaves floats.

    Args:
      grads: the gradient pytree, the reference structure.
      trees: name -> pytree (e.g. "state.mu", "params") checked against it.
    """
    grad_paths, treedef = jax.tree_util.tree_flatten_with_path(grads)
    for path, grad in grad_paths:
        _check_float_leaf(f"grads{jax.tree_util.keystr(path)}", grad)
    for name, tree in trees.items():
        for leaf, (path, grad) in zip(
            _leaves_like(name, tree, treedef), grad_paths, strict=True
        ):
            path = jax.tree_util.keystr(path)
            _check_float_leaf(f"{name}{path}", leaf)
            if jnp.shape(leaf) != jnp.shape(grad):
                raise ValueError(
                    f"{name}{path} has shape {jnp.shape(leaf)} but the gradient "
                    f"has shape {jnp.shape(grad)}"
                )


def _check_float_leaf(name: str, leaf: Any) -> None:
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.inexact):
        raise TypeError(
            f"{name} has dtype {dtype} (shape {jnp.shape(leaf)}); AMSGrad takes "
            "floating-point leaves (real or complex) only"
        )


def check_complex_leaf(path: str, grad, mu, param, mu_dtype) -> None:
    """Refuses what would drop a complex leaf's imaginary part: a real
    `mu_dtype` or a real param for a complex gradient or first moment."""
    complex_leaf = next(
        (
            (name, x)
            for name, x in ((f"grads{path}", grad), (f"state.mu{path}", mu))
            if jnp.iscomplexobj(x)
        ),
        None,
    )
    if complex_leaf is None:
        return
    name, x = complex_leaf
    described = f"{name} is complex ({jnp.result_type(x)})"
    if mu_dtype is not None:
        raise TypeError(
            f"{described} but mu_dtype={jnp.dtype(mu_dtype).name} is real: "
            "casting mu to it would drop its imaginary part; use mu_dtype=None "
            "for complex leaves"
        )
    if param is not None and not jnp.iscomplexobj(param):
        raise TypeError(
            f"{described} but params{path} is real ({jnp.result_type(param)}): "
            "the update's imaginary part would be dropped"
        )
