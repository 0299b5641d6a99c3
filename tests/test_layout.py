"""The package's layout, read from its source: no import circles, and the
optimizer independent of the command-line tools.

Imports are read with `ast`, so a circle is caught however it is held
together (late attribute lookups included) and whether or not Python could
import it.
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).parents[1]
PACKAGE = "pallas_amsgrad"
TOOLS = f"{PACKAGE}.tools"


def _module_name(path: pathlib.Path, root: pathlib.Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(root: pathlib.Path, package: str) -> dict[str, set[str]]:
    """{module: the package's modules it names in an import}, for every
    module under root/package. `from a import b` names a.b where that is a
    module, else a; a parent package is not counted as imported by its
    children's imports."""
    paths = sorted((root / package).rglob("*.py"))
    modules = {_module_name(path, root): path for path in paths}
    graph = {}
    for name, path in modules.items():
        imported = set()
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # Relative: from the module's own package.
                    anchor = name.split(".")
                    anchor = anchor[: len(anchor) - node.level + is_package]
                    base = ".".join([*anchor, base] if base else anchor)
                for alias in node.names:
                    candidate = f"{base}.{alias.name}"
                    imported.add(candidate if candidate in modules else base)
        graph[name] = {m for m in imported if m in modules and m != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_module_imports_a_module_that_imports_it_back():
    graph = import_graph(ROOT, PACKAGE)
    assert f"{PACKAGE}.kernels.common" in graph, "the layout was not read"
    assert sorted(circles(graph)) == []


def test_the_optimizer_imports_nothing_from_the_tools():
    graph = import_graph(ROOT, PACKAGE)
    library = {m for m in graph if not (m == TOOLS or m.startswith(TOOLS + "."))}
    offending = {
        module: sorted(m for m in graph[module] if m.startswith(TOOLS))
        for module in library
    }
    assert {m: i for m, i in offending.items() if i} == {}


def test_spec_imports_neither_pallas_nor_the_package_nor_optax():
    """The oracle is plain jax.numpy: it cannot share a bug with what it judges."""
    for path in (ROOT / "spec").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for name in names:
                assert not name.startswith((PACKAGE, "optax", "jax.experimental")), (
                    path,
                    name,
                )


def test_the_checks_find_a_circle_and_a_tools_import(tmp_path):
    """The checks can fail: a package whose kernel module and dispatcher
    import each other, and whose step imports a tool."""
    package = tmp_path / "pkg"
    (package / "tools").mkdir(parents=True)
    (package / "__init__.py").write_text("from pkg import _step\n")
    (package / "_kernel.py").write_text("from pkg import _tpu\n")
    (package / "_tpu.py").write_text("from . import _kernel\n")
    (package / "_step.py").write_text("import pkg.tools.verify\n")
    (package / "tools" / "__init__.py").write_text("")
    (package / "tools" / "verify.py").write_text("from pkg import _step\n")
    graph = import_graph(tmp_path, "pkg")
    assert sorted(circles(graph)) == [
        ["pkg._kernel", "pkg._tpu"],
        ["pkg._step", "pkg.tools.verify"],
    ]
    assert graph["pkg._step"] == {"pkg.tools.verify"}
