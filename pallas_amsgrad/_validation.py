"""Trace-time checks: bad input raises naming the leaf and the value."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_amsgrad import _quantization


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
    _check_unless_schedule(check_scalar, "learning_rate", learning_rate)


def _check_unless_schedule(check, name: str, value: Any) -> None:
    """`check(name, value)` unless `value` is a schedule, whose type error
    then names the schedule as the other choice."""
    if callable(value):
        return
    try:
        check(name, value)
    except TypeError as error:
        raise TypeError(
            f"{error}, or a schedule (a callable of the step count)"
        ) from None


def canonical_state_dtype(name: str, value: Any) -> jnp.dtype | None:
    """`mu_dtype` or `nu_dtype` as a dtype: None, a real floating dtype, or
    the 8-bit one of quantized storage (int8 for mu, whose values are signed;
    uint8 for nu and nu_max, which are not)."""
    if value is None:
        return None
    try:
        dtype = jax.dtypes.canonicalize_dtype(value)
    except TypeError:
        raise TypeError(f"{name}={value!r} is not a dtype") from None
    eight_bits = jnp.dtype(jnp.int8 if name == "mu_dtype" else jnp.uint8)
    if dtype == eight_bits:
        return dtype
    if dtype in _quantization.QUANTIZED_DTYPES:
        moments = (
            "mu, which is signed"
            if name == "mu_dtype"
            else "nu and nu_max, which are not negative"
        )
        raise TypeError(
            f"{name}={dtype.name}: 8-bit state of {moments}, is "
            f"{name}={eight_bits.name}"
        )
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"{name}={value!r} must be a floating-point dtype, or "
            f"jnp.{eight_bits.name} for 8-bit block-quantized state"
        )
    return dtype


def check_quantization_block(block: Any, mu_dtype: Any, nu_dtype: Any) -> int:
    """`quantization_block` as an int: None (the default, 256), or a positive
    multiple of the kernels' 128 lanes, given only with 8-bit state."""
    if block is None:
        return _quantization.QUANTIZATION_BLOCK
    if isinstance(block, bool) or not isinstance(block, int | np.integer):
        raise TypeError(
            f"quantization_block={block!r} must be a Python int (a static "
            "argument: with optax.inject_hyperparams, list it in static_args)"
        )
    unit = _quantization.BLOCK_UNIT
    if block <= 0 or block % unit:
        raise ValueError(
            f"quantization_block={block} must be a positive multiple of {unit} "
            f"(the TPU's and the GPU kernel's {unit} lanes), e.g. 256"
        )
    if not any(
        d is not None and jnp.dtype(d) in _quantization.QUANTIZED_DTYPES
        for d in (mu_dtype, nu_dtype)
    ):
        raise ValueError(
            f"quantization_block={block} applies to 8-bit state only: give "
            "mu_dtype=jnp.int8 and/or nu_dtype=jnp.uint8, or leave it None"
        )
    return int(block)


def check_nu_dtype(name: str, leaf_dtype: Any, nu_dtype: Any) -> None:
    """`nu_dtype` narrows storage only: it may not be wider than the dtype the
    leaf is computed in (its own, at least float32), nor real for a complex
    leaf (whose nu optax keeps complex)."""
    if nu_dtype is None:
        return
    leaf_dtype = jnp.dtype(leaf_dtype)
    if jnp.dtype(nu_dtype) in _quantization.QUANTIZED_DTYPES:
        if jnp.issubdtype(leaf_dtype, jnp.complexfloating):
            raise TypeError(
                f"{name} is complex ({leaf_dtype}) but nu_dtype=uint8 is "
                "real; use nu_dtype=None for complex leaves"
            )
        return
    if jnp.issubdtype(leaf_dtype, jnp.complexfloating):
        raise TypeError(
            f"{name} is complex ({leaf_dtype}) but "
            f"nu_dtype={jnp.dtype(nu_dtype).name} is real; use nu_dtype=None "
            "for complex leaves"
        )
    compute = jnp.promote_types(leaf_dtype, jnp.float32)
    if jnp.finfo(nu_dtype).bits > jnp.finfo(compute).bits:
        raise ValueError(
            f"nu_dtype={jnp.dtype(nu_dtype).name} is wider than {name}'s "
            f"computation ({compute.name}): nu_dtype only narrows the storage of "
            "nu and nu_max"
        )


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
            if not isinstance(leaf, _quantization.QuantizedArray):
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


def _concrete(value: Any) -> Any:
    """The value as a NumPy scalar where it is known at trace time, else None."""
    if isinstance(value, jax.core.Tracer):
        return None
    return np.asarray(value)


def check_non_negative(name: str, value: Any, *, allow_zero: bool = True) -> None:
    """A real scalar, not negative (nor zero unless `allow_zero`) where known."""
    check_scalar(name, value)
    concrete = _concrete(value)
    if concrete is not None and (concrete < 0 or (not allow_zero and concrete == 0)):
        sign = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name}={value!r} must be {sign}")


def check_weight_decay(weight_decay: Any) -> None:
    """None (no decay term), a non-negative scalar, or a schedule."""
    if weight_decay is None:
        return
    _check_unless_schedule(check_non_negative, "weight_decay", weight_decay)


def check_max_consecutive_errors(value: Any) -> None:
    """None, or an integer of at least 1 (where known at trace time)."""
    if value is None:
        return
    dtype = jnp.result_type(value) if not isinstance(value, bool) else None
    if dtype is None or not jnp.issubdtype(dtype, jnp.integer) or jnp.ndim(value):
        raise TypeError(
            f"max_consecutive_errors={value!r} must be an integer (or None)"
        )
    concrete = _concrete(value)
    if concrete is not None and concrete < 1:
        raise ValueError(
            f"max_consecutive_errors={value!r} must be at least 1: the number "
            "of consecutive non-finite steps skipped before one is applied"
        )


def check_stochastic_rounding(stochastic_rounding: Any, seed: Any) -> None:
    """A bool, and a seed that is None (0) or an integer scalar (a Python or
    NumPy int, or an integer array, traced too): its value taken modulo 2**32."""
    if not isinstance(stochastic_rounding, bool | np.bool_):
        raise TypeError(
            f"stochastic_rounding={stochastic_rounding!r} must be True or False"
        )
    if seed is None:
        return
    integer = not isinstance(seed, bool | np.bool_) and (
        isinstance(seed, int | np.integer)
        or (
            hasattr(seed, "dtype")
            and jnp.issubdtype(seed.dtype, jnp.integer)
            and jnp.ndim(seed) == 0
        )
    )
    if not integer:
        raise TypeError(f"seed={seed!r} must be an integer scalar")


def check_mask(mask: Any) -> None:
    """None, a callable, or a pytree whose leaves are all Python/NumPy bools."""
    if mask is None or callable(mask):
        return
    for path, leaf in jax.tree_util.tree_flatten_with_path(mask)[0]:
        if not isinstance(leaf, bool | np.bool_):
            raise TypeError(
                f"mask{jax.tree_util.keystr(path)}={leaf!r} must be a bool: a mask "
                "is a pytree of True (decayed) and False, or a callable of the "
                "params returning one"
            )


def decayed_leaves(mask: Any, grads: Any) -> tuple[bool, ...]:
    """Per leaf of `grads`, its mask value. `mask` is None (every leaf), a
    callable of `grads` returning a mask, or a mask: a prefix of the
    gradients' structure, each of its bools covering a whole subtree."""
    if mask is None:
        return (True,) * len(jax.tree.leaves(grads))
    mask_tree = mask(grads) if callable(mask) else mask
    check_mask(mask_tree)
    mask_leaves, mask_def = jax.tree_util.tree_flatten(mask_tree)
    try:
        subtrees = mask_def.flatten_up_to(grads)
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"mask has the structure {mask_def}, which is not a prefix of the "
            f"gradients' (and params') {jax.tree.structure(grads)}: {error}"
        ) from None
    return tuple(
        bool(flag)
        for flag, subtree in zip(mask_leaves, subtrees, strict=True)
        for _ in jax.tree.leaves(subtree)
    )


_REQUESTS = (("mu", "mu_dtype"), ("nu", "nu_dtype"), ("nu_max", "nu_dtype"))


def check_moments(path: str, grad, moments, hp) -> tuple[bool, bool, bool]:
    """Which of a leaf's moments (mu, nu, nu_max) are quantized; raises,
    naming the leaf, where the state does not match what `hp` asks for (a
    state made by another configuration: `convert_state` converts it)."""
    shape = tuple(jnp.shape(grad))
    quantized = []
    for (name, argument), moment in zip(_REQUESTS, moments, strict=True):
        requested = getattr(hp, argument)
        expected = _quantization.stored_dtype(shape, requested)
        wanted = (
            expected is not None
            and jnp.dtype(expected) in _quantization.QUANTIZED_DTYPES
        )
        found = isinstance(moment, _quantization.QuantizedArray)
        where = f"state.{name}{path}"
        if wanted != found:
            described = (
                f"quantized ({moment.dtype.name} codes)"
                if found
                else f"an array of {jnp.result_type(moment)}"
            )
            raise ValueError(
                f"{where} is {described}, but {argument}="
                f"{None if requested is None else jnp.dtype(requested).name} "
                f"{'stores it quantized' if wanted else 'does not quantize it'} "
                f"(leaf shape {shape}); make the state with this optimizer's "
                "init, or convert it with pallas_amsgrad.convert_state"
            )
        if not found:
            quantized.append(False)
            continue
        if jnp.dtype(grad.dtype) not in (
            jnp.dtype(jnp.float32),
            jnp.dtype(jnp.bfloat16),
            jnp.dtype(jnp.float16),
        ):
            raise TypeError(
                f"grads{path} is {jnp.dtype(grad.dtype).name}: 8-bit state is "
                "computed in float32, for float32, bfloat16 and float16 leaves; "
                f"use {argument}=None for this leaf's optimizer"
            )
        if moment.dtype != expected:
            raise TypeError(
                f"{where} has {moment.dtype.name} codes but {argument}="
                f"{jnp.dtype(expected).name}"
            )
        if moment.block != hp.quantization_block:
            raise ValueError(
                f"{where} is quantized in blocks of {moment.block} but "
                f"quantization_block={hp.quantization_block}; convert it with "
                "pallas_amsgrad.convert_state"
            )
        scales = _quantization.scale_shape(shape, moment.block)
        if tuple(moment.scales.shape) != scales or moment.scales.dtype != jnp.float32:
            raise ValueError(
                f"{where}.scales is {moment.scales.dtype}{list(moment.scales.shape)}"
                f" but a leaf of shape {shape} in blocks of {moment.block} has "
                f"float32{list(scales)}"
            )
        quantized.append(True)
    return tuple(quantized)
