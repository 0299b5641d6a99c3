"""Implementations as values: small frozen objects that carry their settings.

`implementation=` takes a name from `IMPLEMENTATIONS` ("pallas", "xla"), an
implementation object, or None for `Default`, which picks one for the device
the step is placed on (`implementation_for`, the one place that choice is
made). Each object is hashable, so it can be a static argument, and callable
on one dtype group:

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

from pallas_amsgrad import _math, _rounding
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
        streams: _rounding.Streams | None = None,
    ) -> list[tuple[jax.Array, ...]]: ...


@dataclasses.dataclass(frozen=True)
class Pallas:
    """The fused kernel: Mosaic on TPU, Mosaic GPU on NVIDIA GPUs, Pallas'
    generic interpreter elsewhere. Differentiable: `jax.grad`, `jvp` and
    `vjp` take the XLA path's derivatives (the kernel, which writes in
    place, has none of its own; see `_sharding`).

    Attributes:
      block_sizes: overrides each platform's default `BlockSizes`.
      interpret_params: runs the TPU kernel (`pltpu.InterpretParams`) or the
        GPU kernel (Mosaic GPU's `InterpretGPUParams`) in Pallas' interpreter
        for that device, on any backend: the device's kernel, tested without
        the device.
      platforms: the platforms ("tpu", "cuda", "cpu", ...) the step may be
        lowered for, e.g. `("tpu",)`: only their kernels are traced, which
        saves tracing each leaf's kernels for the others (on CPU, where the
        generic interpreter runs, both). None: any platform, chosen at
        lowering, as `jax.export(..., platforms=[...])` needs.
    """

    name: ClassVar[str] = "pallas"
    block_sizes: common.BlockSizes | None = None
    interpret_params: Any = None
    platforms: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.block_sizes is not None and not isinstance(
            self.block_sizes, common.BlockSizes
        ):
            raise TypeError(
                f"block_sizes={self.block_sizes!r} must be a BlockSizes or None"
            )
        if self.platforms is not None and not (
            isinstance(self.platforms, tuple)
            and self.platforms
            and all(isinstance(p, str) and p == p.lower() for p in self.platforms)
        ):
            raise TypeError(
                f"platforms={self.platforms!r} must be None or a non-empty tuple "
                'of lowercase platform names, e.g. ("tpu",)'
            )

    def __call__(self, coefficients, leaves, *, out_dtypes, operands, streams=None):
        return dispatch.amsgrad_pallas_group(
            coefficients,
            leaves,
            out_dtypes=out_dtypes,
            operands=operands,
            streams=streams,
            block_sizes=self.block_sizes,
            interpret_params=self.interpret_params,
            platforms=self.platforms,
        )


@dataclasses.dataclass(frozen=True)
class Xla:
    """The same block math on whole arrays, fused by XLA; no Pallas."""

    name: ClassVar[str] = "xla"

    def __call__(self, coefficients, leaves, *, out_dtypes, operands, streams=None):
        return xla.amsgrad_xla_group(
            coefficients,
            leaves,
            out_dtypes=out_dtypes,
            operands=operands,
            streams=streams,
        )


IMPLEMENTATIONS = types.MappingProxyType({"pallas": Pallas(), "xla": Xla()})

# Mosaic GPU's TMA copies and warpgroup layouts need Hopper (sm_90) or newer.
MOSAIC_GPU_MIN_CAPABILITY = (9, 0)


@dataclasses.dataclass(frozen=True)
class Target:
    """What the choice of implementation depends on, read from a device.

    Attributes:
      platform: "tpu", "cuda", "rocm", "cpu", or another backend's name.
      device_kind: e.g. "NVIDIA H100 80GB HBM3", for messages.
      compute_capability: (major, minor) on CUDA, else None.
    """

    platform: str
    device_kind: str
    compute_capability: tuple[int, int] | None = None

    @classmethod
    def of(cls, device) -> Target:
        """The target of a `jax.Device` (or any object with its attributes:
        `platform`, `device_kind`, `compute_capability` on CUDA and
        `client.platform_version`, which names ROCm)."""
        platform = device.platform
        if platform == "gpu":  # jax names both CUDA and ROCm devices "gpu".
            version = getattr(getattr(device, "client", None), "platform_version", "")
            platform = "rocm" if "rocm" in str(version).lower() else "cuda"
        capability = None
        if platform == "cuda":
            major, _, minor = str(device.compute_capability).partition(".")
            capability = (int(major), int(minor or 0))
        return cls(platform, str(device.device_kind), capability)

    def __str__(self):
        if self.compute_capability is None:
            return f"{self.device_kind} ({self.platform})"
        return (
            f"{self.device_kind} (CUDA compute capability "
            f"{'.'.join(map(str, self.compute_capability))})"
        )

    def cannot_compile_kernel(self) -> str | None:
        """Why no compiled Pallas kernel of this package runs here, or None
        where one does (TPU; CUDA from Hopper on) or Pallas interprets it
        (CPU and other backends)."""
        if self.platform == "rocm":
            return "its Mosaic GPU kernel supports NVIDIA GPUs only"
        if self.platform == "cuda" and (
            self.compute_capability < MOSAIC_GPU_MIN_CAPABILITY
        ):
            return (
                "its Mosaic GPU kernel needs compute capability "
                f"{'.'.join(map(str, MOSAIC_GPU_MIN_CAPABILITY))} or higher "
                "(Hopper and newer)"
            )
        return None


# Whether `implementation=None` runs the kernel on a platform where it
# compiles, and the measurement that decided it (docs/design-and-kernels.md).
KERNEL_BY_DEFAULT = {
    # Not yet measured on a TPU. The kernel is one pass over each dtype
    # group, in place.
    "tpu": True,
    # Measured on an H100 (jax 0.11.2, commit dc10525;
    # benchmarks/results/h100-dc10525): on 256M float32 parameters in one
    # leaf the donated kernel step took 3.63 ms, as long as XLA's fusion of
    # optax + apply (3.63 ms); on 16 leaves its first call took 4.44 ms
    # against the XLA path's 3.16 ms, after compiling for 10.1 s against
    # 0.2 s. The kernel does not earn the default on GPUs.
    "cuda": False,
}


def implementation_for(device, block_sizes: common.BlockSizes | None = None):
    """The implementation `implementation=None` runs on `device`.

    The kernel where it compiles and the measurements favour it
    (`KERNEL_BY_DEFAULT`: TPU), else the XLA path (NVIDIA GPUs, where the
    kernel compiles from Hopper on but is not faster; ROCm; CPU, where the
    kernel would be interpreted; any other backend).

    Args:
      device: a `jax.Device` (or any object with its `platform`,
        `device_kind` and, on CUDA, `compute_capability`).
      block_sizes: the kernel's block sizes, where the kernel is chosen.

    Returns:
      A `Pallas` or `Xla` object, which `implementation=` also takes.

    Examples:
      >>> import jax
      >>> import pallas_amsgrad
      >>> pallas_amsgrad.implementation_for(jax.devices("cpu")[0])
      Xla()
    """
    target = Target.of(device)
    if (
        KERNEL_BY_DEFAULT.get(target.platform, False)
        and target.cannot_compile_kernel() is None
    ):
        return Pallas(block_sizes=block_sizes)
    return IMPLEMENTATIONS["xla"]


def concrete_device(arrays: Sequence[Any]):
    """The device of the first concrete (not traced) array, or None."""
    for x in arrays:
        if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
            return min(x.devices(), key=lambda d: d.id)
    return None


def placed_device(arrays: Sequence[Any]):
    """The device a step on `arrays` runs on, as far as tracing can see it:
    that of a concrete input, else of the mesh in context (`jax.set_mesh`,
    or `jax.sharding.use_abstract_mesh` naming a TPU this host may lack),
    else jax's default device."""
    concrete = concrete_device(arrays)
    if concrete is not None:
        return concrete
    abstract = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    if abstract is not None:
        try:
            local = jax.devices(abstract.platform)
        except RuntimeError:  # Lowered for a platform this host has none of.
            local = []
        for device in local:
            if device.device_kind == abstract.device_kind:
                return device
        if abstract.platform == "tpu":  # Its kind is all the choice needs.
            return abstract
    default = jax.config.jax_default_device
    if isinstance(default, str):
        return jax.devices(default)[0]
    if default is not None:
        return default
    return jax.devices()[0]


@dataclasses.dataclass(frozen=True)
class Default:
    """`implementation=None`: `implementation_for` the device the step is
    placed on."""

    name: ClassVar[str] = "default"
    block_sizes: common.BlockSizes | None = None

    def __call__(self, coefficients, leaves, *, out_dtypes, operands, streams=None):
        device = placed_device([x for leaf in leaves for x in leaf])
        return call(
            for_device(self, device),
            coefficients,
            leaves,
            out_dtypes=out_dtypes,
            operands=operands,
            streams=streams,
        )


def call(implementation, coefficients, leaves, *, out_dtypes, operands, streams):
    """`implementation` on a group; `streams` passed only where the group
    rounds stochastically, so an implementation object written without it
    still runs every other step."""
    extra = {} if streams is None else {"streams": streams}
    return implementation(
        coefficients, leaves, out_dtypes=out_dtypes, operands=operands, **extra
    )


def for_device(implementation: Implementation, device) -> Implementation:
    """`implementation` as it runs on `device`: `Default` picks one; a
    `Pallas` that would compile for a device its kernels do not support
    raises, naming the device."""
    if isinstance(implementation, Default):
        return implementation_for(device, implementation.block_sizes)
    if isinstance(implementation, Pallas) and implementation.interpret_params is None:
        target = Target.of(device)
        reason = target.cannot_compile_kernel()
        if reason is not None:
            raise ValueError(
                f"implementation='pallas' cannot run on {target}: {reason}. "
                "Use implementation='xla' (the same math as XLA fusions), or "
                "None, which picks it on this device."
            )
    return implementation


def for_group(
    implementation: Implementation,
    operands: Any,
    compute: Any,
    *,
    chosen_for: str | None = None,
) -> Implementation:
    """What runs one dtype group: the XLA path for complex leaves (the
    kernels are written for real dtypes); else `implementation`, where the
    default chose a kernel (`chosen_for`, the device's platform) lowered
    for that platform alone if the group has 8-bit state (`Pallas()` would
    also trace the GPU kernel, which refuses rows too long to take whole
    that end in a shorter quantization block)."""
    if jnp.issubdtype(compute, jnp.complexfloating):
        return IMPLEMENTATIONS["xla"]
    if (
        chosen_for is not None
        and operands.quantizes
        and isinstance(implementation, Pallas)
    ):
        return dataclasses.replace(implementation, platforms=(chosen_for,))
    return implementation


def check_platforms(implementation: Implementation, arrays: Sequence[Any]) -> None:
    """Raises where a `Pallas` lowered for some platforms only is called on
    concrete arrays of another (traced arrays may be exported for any)."""
    platforms = getattr(implementation, "platforms", None)
    device = concrete_device(arrays)
    if platforms is None or device is None:
        return
    target = Target.of(device)
    if target.platform not in platforms:
        raise ValueError(
            f"implementation={implementation!r} is lowered only for "
            f"platforms={platforms}, but the step runs on {target}: add "
            f"{target.platform!r} to its platforms, or leave them None"
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
