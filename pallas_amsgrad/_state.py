"""Reading and converting the optimizer state between storage configurations.

`dequantize` reads any moment as float32; `convert_state` rewrites every
`optax.ScaleByAmsgradState` inside an optimizer state (however the recipe or
other transformations nest it) for other `mu_dtype`, `nu_dtype` or
`quantization_block`, so that a running training can switch to (or from)
8-bit state between two steps.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from pallas_amsgrad import _quantization, _validation

dequantize = _quantization.dequantize


def _round_up(x: jax.Array, dtype: Any) -> jax.Array:
    """x (float32) in `dtype`, rounded toward +inf: the stored maximum never
    falls below the one it replaces."""
    nearest = x.astype(dtype)
    below = nearest.astype(jnp.float32) < x
    return jnp.where(
        below, jnp.nextafter(nearest, jnp.asarray(jnp.inf, dtype)), nearest
    )


def _convert_moment(moment, param, requested, rounding, block, name):
    """One moment in the storage `requested` asks for (None: the param's
    dtype, as optax keeps it), read exactly and rounded once."""
    shape = tuple(jnp.shape(param))
    if tuple(jnp.shape(moment)) != shape:
        raise ValueError(
            f"{name} has shape {tuple(jnp.shape(moment))} but its param {shape}"
        )
    target = _quantization.stored_dtype(shape, requested)
    target = jnp.result_type(param) if target is None else jnp.dtype(target)
    if target in _quantization.QUANTIZED_DTYPES:
        if (
            isinstance(moment, _quantization.QuantizedArray)
            and moment.dtype == target
            and moment.block == block
        ):
            return moment
        return _quantization.quantize(
            dequantize(moment), _quantization.code_map(target), rounding, block=block
        )
    if not isinstance(moment, _quantization.QuantizedArray):
        if jnp.result_type(moment) == target:
            return moment
        if rounding != "up" or jnp.finfo(target).bits >= 32:
            return jnp.asarray(moment).astype(target)
    value = dequantize(moment)
    if rounding == "up" and jnp.finfo(target).bits < 32:
        return _round_up(value, target)
    return value.astype(target)


def convert_state(
    state: Any,
    params: Any,
    *,
    mu_dtype: Any | None = None,
    nu_dtype: Any | None = None,
    quantization_block: int | None = None,
) -> Any:
    """`state` with every AMSGrad state in it stored as an optimizer made with
    these `mu_dtype`, `nu_dtype` and `quantization_block` keeps it.

    Each moment is read exactly (8-bit codes dequantized) and rounded once to
    its new storage: `mu` and `nu` to nearest, `nu_max` up, so the converted
    maximum is never below the one it replaces and AMSGrad's step bound
    holds across the switch. Moments already in the requested storage are
    kept as they are; everything else in `state` (counts, the recipe's
    state) is returned unchanged.

    Args:
      state: an optimizer state holding `optax.ScaleByAmsgradState`s (from
        `amsgrad(...).init`, `scale_by_amsgrad(...).init`, or a chain).
      params: the params (arrays or `jax.ShapeDtypeStruct`s): their shapes
        decide which leaves are quantized, their dtypes where a dtype is None.
      mu_dtype, nu_dtype, quantization_block: as `amsgrad` takes them.

    Returns:
      The converted state, which `amsgrad(..., mu_dtype=mu_dtype,
      nu_dtype=nu_dtype, quantization_block=quantization_block)` steps.

    Examples:
      >>> import jax.numpy as jnp
      >>> import pallas_amsgrad
      >>> params = {"w": jnp.ones((64, 256))}
      >>> state = pallas_amsgrad.amsgrad(1e-3).init(params)
      >>> state = pallas_amsgrad.convert_state(
      ...     state, params, mu_dtype=jnp.int8, nu_dtype=jnp.uint8)
      >>> state[0].nu_max["w"].codes.dtype
      dtype('uint8')
    """
    mu_dtype = _validation.canonical_state_dtype("mu_dtype", mu_dtype)
    nu_dtype = _validation.canonical_state_dtype("nu_dtype", nu_dtype)
    block = _validation.check_quantization_block(quantization_block, mu_dtype, nu_dtype)
    found = []

    def convert(node):
        if not isinstance(node, optax.ScaleByAmsgradState):
            return node
        found.append(node)
        treedef = jax.tree.structure(params)
        paths = [
            jax.tree_util.keystr(path) for path, _ in jax.tree.leaves_with_path(params)
        ]
        moments = {}
        for name, requested, rounding in (
            ("mu", mu_dtype, "nearest"),
            ("nu", nu_dtype, "nearest"),
            ("nu_max", nu_dtype, "up"),
        ):
            try:
                leaves = treedef.flatten_up_to(getattr(node, name))
            except (ValueError, TypeError) as error:
                raise ValueError(
                    f"state.{name} does not have the structure of the params: {error}"
                ) from None
            moments[name] = treedef.unflatten(
                [
                    _convert_moment(
                        m, p, requested, rounding, block, f"state.{name}{path}"
                    )
                    for m, p, path in zip(
                        leaves, jax.tree.leaves(params), paths, strict=True
                    )
                ]
            )
        return node._replace(**moments)

    converted = jax.tree.map(
        convert,
        state,
        is_leaf=lambda x: isinstance(x, optax.ScaleByAmsgradState),
    )
    if not found:
        raise ValueError(
            "state holds no optax.ScaleByAmsgradState: pass the state that "
            "pallas_amsgrad.amsgrad(...).init (or scale_by_amsgrad) made"
        )
    return converted
