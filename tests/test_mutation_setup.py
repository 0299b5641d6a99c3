"""mutmut's set-up (pyproject.toml's [tool.mutmut]) holds.

Each mutant is judged by the tests marked `mutation`: those that
[tool.pallas_amsgrad.mutation] names, each of which must exist.

mutmut forks each mutant's test run from a process that has imported the
selected tests: a module that starts jax's backend at import (a jax array, a
compile) leaves XLA's threads behind in the parent, and every forked run
that compiles waits on them forever.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys
import tomllib

ROOT = pathlib.Path(__file__).parents[1]
TOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]
SELECTION = TOOLS["pallas_amsgrad"]["mutation"]["tests"]

_IMPORT_CHECK = """
import importlib, sys
sys.path.insert(0, "tests")
import conftest
from jax._src import xla_bridge
for module in sys.argv[1:]:
    importlib.import_module(module)
    if xla_bridge._backends:
        sys.exit(f"importing {module} starts jax's backend")
"""


def test_selected_modules_start_no_jax_backend_at_import():
    modules = sorted({pathlib.Path(test.split("::")[0]).stem for test in SELECTION})
    result = subprocess.run(
        [sys.executable, "-c", _IMPORT_CHECK, *modules],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_every_selected_test_exists_and_is_marked():
    assert TOOLS["mutmut"]["pytest_add_cli_args_test_selection"] == ["-m", "mutation"]
    collect = [sys.executable, "-m", "pytest", "-p", "no:xdist", "--collect-only"]
    result = subprocess.run(
        [*collect, "-q", "-m", "mutation"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    marked = {line for line in result.stdout.splitlines() if "::" in line}
    for test in SELECTION:
        assert any(
            line == test or line.startswith((f"{test}::", f"{test}["))
            for line in marked
        ), test
