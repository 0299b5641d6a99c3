"""What a bug report or a benchmark result needs to be reproduced."""

from __future__ import annotations

import importlib.metadata
import os
import pathlib
import platform
import subprocess

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


# Where the source tree travels without its `.git` (e.g. to a device machine),
# the commit it was copied from, set by whoever copied it.
COMMIT_VARIABLE = "PALLAS_AMSGRAD_COMMIT"


def _git(*args: str) -> str | None:
    """`git args` in this package's source tree, or None outside a checkout
    (an installed wheel) or without git."""
    try:
        result = subprocess.run(
            ["git", *args],
            cwd=pathlib.Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def source_revision() -> dict[str, str | bool | None]:
    """The commit the running package comes from and whether its tree
    differed from it (`dirty`: tracked files changed or untracked files
    present; None where unknown)."""
    commit = _git("rev-parse", "HEAD")
    if commit is not None:
        status = _git("status", "--porcelain", "--untracked-files=normal")
        return {"commit": commit, "dirty": None if status is None else bool(status)}
    return {"commit": os.environ.get(COMMIT_VARIABLE) or "unknown", "dirty": None}


def describe_revision(environment_: dict) -> str:
    """ "commit 1a2b3c4", with " (dirty)" where the tree had changes; for a
    header line (older results without a commit say "commit unknown")."""
    commit = environment_.get("commit") or "unknown"
    dirty = " (dirty)" if environment_.get("dirty") else ""
    return f"commit {commit[:7] if commit != 'unknown' else commit}{dirty}"


def environment() -> dict[str, str | bool | None]:
    """Versions, source commit, machine and backend of this process."""
    return {
        "pallas_amsgrad": _version("pallas-amsgrad"),
        **source_revision(),
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
