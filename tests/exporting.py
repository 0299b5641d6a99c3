"""Exporting for a platform this host lacks: `jax.export(platforms=[...])`.

From jax 0.11.2 on, Mosaic TPU's lowering of a kernel's scoped buffers
(`pl.run_scoped`) reads the TPU's kind: from a host without TPUs, an
abstract mesh names the TPU a program is lowered for. jax 0.10 reads
nothing, so the mesh changes nothing there.
"""

from __future__ import annotations

import contextlib

import jax
from jax.sharding import AbstractDevice, AbstractMesh

TPU = AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu")


@contextlib.contextmanager
def lowering_for(platform: str):
    """The context in which to export for `platform` from this host."""
    if platform != "tpu" or jax.default_backend() == "tpu":
        yield
        return
    with jax.sharding.use_abstract_mesh(
        AbstractMesh((1,), ("x",), abstract_device=TPU)
    ):
        yield


def export(fn, platform: str, *args) -> str:
    """The MLIR text of `fn` (jitted) exported for `platform` with `args`."""
    with lowering_for(platform):
        return jax.export.export(fn, platforms=[platform])(*args).mlir_module()
