"""Exporting for a platform this host lacks: `jax.export(platforms=[...])`.

From jax 0.11.2 on, Mosaic TPU's lowering of a kernel's scoped buffers
(`pl.run_scoped`) reads the TPU's kind: from a host without TPUs, an
abstract mesh names the TPU a program is lowered for. jax 0.10 reads
nothing, so the mesh changes nothing there.
"""

from __future__ import annotations

import contextlib
import functools
import re

import jax
from jax.sharding import AbstractDevice, AbstractMesh

TPU = AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu")


@contextlib.contextmanager
def lowering_for(platform: str):
    """The context in which to export for `platform` from this host."""
    if platform != "tpu" or jax.default_backend() == "tpu":
        yield
        return
    # No axes: a mesh of one device whose only news is the device (from jax
    # 0.11.1 a named axis defaults to Explicit, which would shard the step).
    with jax.sharding.use_abstract_mesh(AbstractMesh((), (), abstract_device=TPU)):
        yield


def export(fn, platform: str, *args) -> str:
    """The MLIR text of `fn` (jitted) exported for `platform` with `args`."""
    with lowering_for(platform):
        return jax.export.export(fn, platforms=[platform])(*args).mlir_module()


_FUNCTION = re.compile(r"^\s*func\.func (?:public |private )?@([\w.$-]+)\(")
_CALL = re.compile(r"\bcall @([\w.$-]+)\(")


def launches(module: str, target: str) -> list[str]:
    """The lines of `module`'s custom calls to `target` (e.g.
    "mosaic_gpu_v2"), each repeated once per time the program runs it: jit
    lowers an inner jit called with the same shapes once, as a private
    function that each call site calls (the GPU kernel's launch per leaf)."""
    bodies: dict[str, list[str]] = {}
    lines: list[str] = []
    for line in module.splitlines():
        if match := _FUNCTION.match(line):
            lines = bodies.setdefault(match[1], [])
        lines.append(line)
    callers: dict[str, list[str]] = {name: [] for name in bodies}
    for name, body in bodies.items():
        for line in body:
            for callee in _CALL.findall(line):
                if callee in bodies:
                    callers[callee].append(name)

    @functools.cache
    def runs(name: str) -> int:
        return 1 if name == "main" else sum(map(runs, callers[name]))

    return [
        line
        for name, body in bodies.items()
        for line in body
        if f"custom_call @{target}(" in line
        for _ in range(runs(name))
    ]


def mesh_for(mesh, platform: str):
    """`mesh` as a program lowered for `platform` from this host sees it: for
    TPU from a host without TPUs, an abstract mesh of its shape on TPUs."""
    if platform != "tpu" or jax.default_backend() == "tpu":
        return mesh
    return AbstractMesh(
        mesh.axis_sizes,
        mesh.axis_names,
        axis_types=mesh.axis_types,
        abstract_device=TPU,
    )


def using(mesh):
    """The context of `mesh`: `jax.set_mesh` for devices, `use_abstract_mesh`
    for an abstract mesh."""
    if isinstance(mesh, AbstractMesh):
        return jax.sharding.use_abstract_mesh(mesh)
    return jax.set_mesh(mesh)
