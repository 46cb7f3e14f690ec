"""The import graph of jaxgen and pallas_kernels, read with `ast` from every source file (imports
inside functions included, since a function-local import hides a cycle rather than removing
it): no cycle among modules, and the package arrows run one way."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("jaxgen", "pallas_kernels")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (anywhere in its file)."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's package
                    anchor = name.split(".")[: len(name.split(".")) - node.level + is_package]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import submodule` imports the submodule; names that are not
                # submodules come from the package itself.
                subs = [f"{base}.{alias.name}" for alias in node.names]
                targets = [t if t in modules else base for t in subs]
            for target in targets:
                while target and target not in modules:  # `import a.b.c` of a package's attribute
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one member (Tarjan)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def package_of(module: str) -> str:
    """jaxgen.server.cli -> jaxgen.server; jaxgen.engine -> jaxgen.engine (a top-level module)."""
    parts = module.split(".")
    return ".".join(parts[:2])


def test_no_import_cycle_among_modules():
    assert cycles(import_graph()) == []


def test_no_import_cycle_among_packages():
    graph: dict[str, set[str]] = {}
    for module, targets in import_graph().items():
        graph.setdefault(package_of(module), set()).update(
            package_of(t) for t in targets if package_of(t) != package_of(module))
    assert cycles(graph) == []


def test_package_arrows():
    """checkpoints -> tokenizer, never back; the front end sees the engine surface, never the
    scheduler; kernels import nothing of jaxgen; the scheduler and the config know no jax."""
    graph = import_graph()

    def imports(prefix: str, forbidden: str) -> list[tuple[str, str]]:
        return sorted((m, t) for m, ts in graph.items() if m.startswith(prefix)
                      for t in ts if t == forbidden or t.startswith(forbidden + "."))

    assert imports("jaxgen.tokenizer", "jaxgen.checkpoints") == []
    assert imports("jaxgen.server", "jaxgen.scheduler") == []
    assert imports("pallas_kernels", "jaxgen") == []
    assert imports("jaxgen.scheduler", "jaxgen.engine") == []
    for light in ("jaxgen.config", "jaxgen.config_sources", "jaxgen.engine_api"):
        assert not [t for t in graph[light] if t.startswith(("jaxgen.runtime", "jaxgen.models"))]


def test_the_walk_sees_function_local_imports_and_cycles(tmp_path):
    """The checker's own slow twin: a cycle hidden in a function is found."""
    tree = ast.parse("def f():\n    from jaxgen.b import x\n")
    assert any(isinstance(n, ast.ImportFrom) and n.module == "jaxgen.b" for n in ast.walk(tree))
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
