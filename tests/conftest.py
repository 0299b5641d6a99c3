"""Hypothesis profiles: `ci` (derandomized, small) and `dev` (larger, random).

Select with HYPOTHESIS_PROFILE=dev; CI uses `ci`, mutmut `mutation`.
"""

import functools
import importlib
import importlib.util
import itertools
import os
import pathlib
import sys
import tomllib

# XLA:CPU contracts a*b + c into one FMA where a fusion allows it, so the last
# bit of a float32 result would depend on how XLA happened to fuse a graph.
# Capping the ISA below FMA makes every test compare IEEE arithmetic, op for
# op. Set before jax starts its CPU backend.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_cpu_max_isa=AVX"
).strip()

# Where jax has no accelerator backend, XLA:CPU compiles most of the suite's
# time: its LLVM optimizations are skipped (XLA's own HLO passes still run,
# and every program of a run is compiled alike). Set before jax starts its
# CPU backend, so the lanes' subprocesses inherit it.
_ACCELERATOR_PLUGINS = (
    "jax_cuda12_plugin",
    "jax_cuda13_plugin",
    "libtpu",
    "jax_rocm7_plugin",
)
if not any(importlib.util.find_spec(name) for name in _ACCELERATOR_PLUGINS):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()

import jax  # noqa: E402

# Pallas' Mosaic GPU interpreter runs jax computations inside its callbacks.
# With async dispatch on CPU such a computation can queue behind one the test
# dispatched meanwhile, which waits on the kernel's output: a deadlock (hung
# CI once, jax 0.10.2). Computations run inline instead. Set before jax
# starts its CPU backend.
jax.config.update("jax_cpu_enable_async_dispatch", False)

# mutmut runs the suite in a copy of the tree, mutants/, whose spec/ holds the
# mutated spec. The installed `amsgrad_spec` is the unmutated spec/, so there
# the copy is imported under its path name and aliased.
_IN_MUTANTS = pathlib.Path(__file__).resolve().parents[1].name == "mutants"
if _IN_MUTANTS:
    sys.modules["amsgrad_spec"] = importlib.import_module("spec")
    # Each mutant runs in a fresh process; most of what it compiles (the
    # spec, optax, unmutated functions) is the same program every time.
    jax.config.update(
        "jax_compilation_cache_dir",
        str(pathlib.Path(__file__).parents[1] / ".jax_cache"),
    )
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

import pytest  # noqa: E402
from hypothesis import HealthCheck, Phase, settings  # noqa: E402
from implementations import IMPLEMENTATIONS, named  # noqa: E402


@pytest.fixture(scope="session", params=IMPLEMENTATIONS)
def implementation(request):
    """Each implementation object in turn: every check that takes this
    fixture runs on all of them."""
    return named(request.param)


def pytest_ignore_collect(collection_path, config):
    """tests/multidevice/ needs 8 CPU devices, which must be set before jax
    starts: tests/test_multidevice.py runs it in a process of its own."""
    if collection_path.name == "multidevice":
        return "--xla_force_host_platform_device_count=8" not in os.environ.get(
            "XLA_FLAGS", ""
        )
    # Under mutmut, only the modules of the selection are imported (into the
    # process each mutant's run forks from; see tests/test_mutation_setup.py).
    if _IN_MUTANTS and collection_path.name.startswith("test_"):
        selected = {entry.split("::")[0] for entry in _mutation_selection()}
        return f"tests/{collection_path.name}" not in selected
    return None


@functools.cache
def _mutation_selection() -> tuple[str, ...]:
    """pyproject.toml's [tool.pallas_amsgrad.mutation] tests: test files,
    tests and parametrizations, as node ids."""
    pyproject = pathlib.Path(__file__).parents[1] / "pyproject.toml"
    table = tomllib.loads(pyproject.read_text())["tool"]["pallas_amsgrad"]
    return tuple(table["mutation"]["tests"])


def _selected(nodeid: str, selection: tuple[str, ...]) -> bool:
    return any(
        nodeid == entry or nodeid.startswith((f"{entry}::", f"{entry}["))
        for entry in selection
    )


def pytest_collection_modifyitems(config, items):
    """Marks the tests mutmut runs per mutant (`-m mutation`); then orders
    the slow tests for xdist."""
    selection = _mutation_selection()
    for item in items:
        if _selected(item.nodeid, selection):
            item.add_marker(pytest.mark.mutation)
    _order_for_xdist(items)


def _order_for_xdist(items):
    """Under xdist, each worker's share of the suite starts with its share
    of the slow tests. The worksteal scheduler hands each worker a
    contiguous range of the collection (the first `n // workers` to the
    first) and steals from the end of a range: a slow test late in its range
    would run alone at the end of the run while the other workers idle."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers < 2:
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    fast = iter([item for item in items if not item.get_closest_marker("slow")])
    ordered, remaining = [], len(items)
    for worker in range(workers):
        size = remaining // (workers - worker)
        share = slow[worker::workers]
        share += itertools.islice(fast, max(0, size - len(share)))
        ordered += share
        remaining -= len(share)
    items[:] = ordered + list(fast)


settings.register_profile(
    "ci",
    max_examples=3,
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev",
    max_examples=50,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# Under mutmut a failing example is all that is needed: shrinking it would
# cost minutes per mutant. Equivalent mutants run every selected test, so the
# property tests draw 3 of `ci`'s 4 examples there; the fixed cases in the
# selection carry the rest.
settings.register_profile(
    "mutation",
    settings.get_profile("ci"),
    max_examples=3,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)
_default_profile = "mutation" if _IN_MUTANTS else "ci"
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", _default_profile))
