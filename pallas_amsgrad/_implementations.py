"""Implementations as values: small frozen objects that carry their settings.

`implementation=` takes a name from `IMPLEMENTATIONS` ("pallas", "xla"), an
implementation object, or None for `Default`, which picks one for the backend
the step is traced for (`for_backend`, the one place that choice is made).
Each object is hashable, so it can be a static argument, and callable on one
dtype group:

    implementation(coefficients, leaves, out_dtypes=..., operands=...)

returns, per leaf, its outputs in `operands` order.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Sequence
from typing import Any, ClassVar, Protocol

import jax
import jax.numpy as jnp

from pallas_amsgrad import _math
from pallas_amsgrad.kernels import common, dispatch, xla


class Implementation(Protocol):
    name: ClassVar[str]

    def __call__(
        self,
        coefficients: jax.Array,
        leaves: Sequence[Sequence[jax.Array]],
        *,
        out_dtypes: Sequence[jnp.dtype],
        operands: _math.Operands,
    ) -> list[tuple[jax.Array, ...]]: ...


@dataclasses.dataclass(frozen=True)
class Pallas:
    """The fused kernel: Mosaic on TPU, Mosaic GPU on NVIDIA GPUs, Pallas'
    generic interpreter elsewhere.

    Attributes:
      block_sizes: overrides each platform's default `BlockSizes`.
      interpret_params: runs the TPU kernel (`pltpu.InterpretParams`) or the
        GPU kernel (Mosaic GPU's `InterpretGPUParams`) in Pallas' interpreter
        for that device, on any backend: the device's kernel, tested without
        the device.
    """

    name: ClassVar[str] = "pallas"
    block_sizes: common.BlockSizes | None = None
    interpret_params: Any = None

    def __post_init__(self):
        if self.block_sizes is not None and not isinstance(
            self.block_sizes, common.BlockSizes
        ):
            raise TypeError(
                f"block_sizes={self.block_sizes!r} must be a BlockSizes or None"
            )

    def __call__(self, coefficients, leaves, *, out_dtypes, operands):
        return dispatch.amsgrad_pallas_group(
            coefficients,
            leaves,
            out_dtypes=out_dtypes,
            operands=operands,
            block_sizes=self.block_sizes,
            interpret_params=self.interpret_params,
        )


@dataclasses.dataclass(frozen=True)
class Xla:
    """The same block math on whole arrays, fused by XLA; no Pallas."""

    name: ClassVar[str] = "xla"

    def __call__(self, coefficients, leaves, *, out_dtypes, operands):
        return xla.amsgrad_xla_group(
            coefficients, leaves, out_dtypes=out_dtypes, operands=operands
        )


IMPLEMENTATIONS = types.MappingProxyType({"pallas": Pallas(), "xla": Xla()})


def for_backend(backend: str, block_sizes: common.BlockSizes | None = None):
    """The default implementation on `backend`: the kernel where it compiles
    (TPU, GPU), the XLA path on CPU, where the kernel would be interpreted."""
    if backend == "cpu":
        return IMPLEMENTATIONS["xla"]
    return Pallas(block_sizes=block_sizes)


@dataclasses.dataclass(frozen=True)
class Default:
    """`implementation=None`: `for_backend` of the backend traced for."""

    name: ClassVar[str] = "default"
    block_sizes: common.BlockSizes | None = None

    def select(self) -> Implementation:
        return for_backend(jax.default_backend(), self.block_sizes)

    def __call__(self, coefficients, leaves, *, out_dtypes, operands):
        return self.select()(
            coefficients, leaves, out_dtypes=out_dtypes, operands=operands
        )


def resolve(
    implementation: str | Implementation | None,
    block_sizes: common.BlockSizes | None = None,
) -> Implementation:
    """The object for `implementation=` and `block_sizes=`; raises naming the
    value that is neither a known name nor an implementation object."""
    if block_sizes is not None and not isinstance(block_sizes, common.BlockSizes):
        raise TypeError(f"block_sizes={block_sizes!r} must be a BlockSizes or None")
    if implementation is None:
        return Default(block_sizes)
    if isinstance(implementation, str):
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"implementation={implementation!r} is not one of "
                f"{(None, *IMPLEMENTATIONS)} or an implementation object"
            )
        implementation = IMPLEMENTATIONS[implementation]
        if block_sizes is not None and isinstance(implementation, Pallas):
            implementation = dataclasses.replace(
                implementation, block_sizes=block_sizes
            )
        return implementation
    if not (
        callable(implementation)
        and isinstance(getattr(implementation, "name", None), str)
    ):
        raise TypeError(
            f"implementation={implementation!r} is not one of "
            f"{(None, *IMPLEMENTATIONS)} or an implementation object (a "
            "callable with a `name`, e.g. pallas_amsgrad.Pallas(...))"
        )
    if block_sizes is not None:
        raise ValueError(
            f"block_sizes={block_sizes!r} given beside the implementation object "
            f"{implementation!r}; set it on the object, e.g. "
            "Pallas(block_sizes=...)"
        )
    return implementation
