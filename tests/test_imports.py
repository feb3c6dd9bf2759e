"""The package's import graph: no cycles between package modules, function-local imports included, and no
private names imported across folders."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_accel"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
PACKAGES = {_module_name(p) for p in PACKAGE.rglob("__init__.py")}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, current: str) -> list[tuple[str, list[str], int]]:
    """(module, names, line) of every import statement, at any depth, outside ``if TYPE_CHECKING:`` blocks."""
    found: list[tuple[str, list[str], int]] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                found.extend((a.name, [], child.lineno) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    pkg = current if current in PACKAGES else current.rpartition(".")[0]
                    for _ in range(child.level - 1):
                        pkg = pkg.rpartition(".")[0]
                    base = f"{pkg}.{base}" if base else pkg
                found.append((base, [a.name for a in child.names], child.lineno))
            visit(child)

    visit(tree)
    return found


def _targets(importer: str, module: str, names: list[str]) -> set[str]:
    """Package modules an import loads: the module (or its submodules named in ``names``) and the ``__init__`` of
    every package on its path that does not contain the importer (importing ``a.b.c`` runs ``a.b``'s init)."""
    if not module.startswith("lightning_accel"):
        return set()
    out = {f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES}
    if len(out) < len(names) or not names:
        out.add(module)
    parts = module.split(".")
    for i in range(1, len(parts)):
        parent = ".".join(parts[:i])
        if parent in PACKAGES and not (importer == parent or importer.startswith(parent + ".")):
            out.add(parent)
    return {t for t in out if t in MODULES and t != importer}


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        edges: set[str] = set()
        for module, names, _ in _imports(ast.parse(path.read_text()), name):
            edges |= _targets(name, module, names)
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_the_walker_sees_function_local_imports_and_package_inits():
    tree = ast.parse("def f():\n    from lightning_accel.pruning.callbacks import StructuredPruning\n")
    (module, names, _), = _imports(tree, "lightning_accel.report.callbacks")
    assert _targets("lightning_accel.report.callbacks", module, names) >= {
        "lightning_accel.pruning.callbacks",
        "lightning_accel.pruning",
    }
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles_between_package_modules():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles (function-local imports count): " + "; ".join(" <-> ".join(c) for c in cycles)


def _folder(module: str) -> str:
    return module if module in PACKAGES else module.rpartition(".")[0]


def test_no_private_names_imported_across_folders():
    crossings = []
    for name, path in MODULES.items():
        for module, names, line in _imports(ast.parse(path.read_text()), name):
            if not module.startswith("lightning_accel"):
                continue
            here, there = _folder(name), _folder(module)
            if here == there:
                continue
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            # private modules of the top level (_lifecycle, _validate, ...) are the shared ones; a folder's are its own
            private_module = [p for p in module.split(".")[1:] if p.startswith("_") and not p.startswith("__")]
            if private or (private_module and there != "lightning_accel"):
                crossings.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {module} {private or ''}")
    assert not crossings, "private names across folders:\n" + "\n".join(crossings)
