"""What a bug report or a benchmark result needs to be reproduced."""

from __future__ import annotations

import importlib.metadata
import os
import platform

import jax
import numpy as np


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment() -> dict[str, str]:
    """Versions, machine and backend of this process."""
    return {
        "pallas_amsgrad": _version("pallas-amsgrad"),
        "jax": jax.__version__,
        "jaxlib": _version("jaxlib"),
        "optax": _version("optax"),
        "numpy": np.__version__,
        "torch": _version("torch"),
        "python": platform.python_version(),
        "machine": f"{platform.system()} {platform.machine()}",
        "cpu": f"{_cpu_model()}, {os.cpu_count()} cores",
        "backend": jax.default_backend(),
        "devices": ", ".join(sorted({d.device_kind for d in jax.devices()})),
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
    }
