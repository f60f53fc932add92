"""The library's import graph has no circle between files and no cycle between packages.

Every ``import`` / ``from ... import`` statement counts, relative ones and those inside functions
(lazy imports) included: a lazy import only hides a circle from the interpreter, not from a reader.
Packages are the first-level subpackages of ``lrqat_dist`` (a top-level module such as
``typed_config`` and the root ``__init__`` count as packages of their own).
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "lrqat_dist"


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under ``root`` (a package's ``__init__`` is the package)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = (root.name,) + path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imported(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The modules of ``mods`` that module ``name`` imports (anywhere in the file)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                if not anchor:
                    raise ValueError(f"{path}: relative import beyond the top-level package")
                base = ".".join(anchor + ([node.module] if node.module else []))
            # `from pkg import sub` imports the submodule; `from pkg import name` the package itself.
            targets += [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
    out = set()
    for target in targets:
        while target and target not in mods:  # `import a.b.c` where only a.b is ours, or a name in a module
            target = target.rpartition(".")[0]
        if target and target != name:
            out.add(target)
    return out


def strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Groups of two or more nodes that reach each other (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:  # iterative would be longer; the graph is small
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(set(edges) | {w for ws in edges.values() for w in ws}):
        if v not in index:
            visit(v)
    return sorted(found)


def graph(root: Path) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(file edges, package edges) of the package at ``root``."""
    mods = modules(root)
    files = {name: imported(name, path, mods) for name, path in mods.items()}

    def package(name: str) -> str:
        return ".".join(name.split(".")[:2])

    packages = defaultdict(set)
    for a, targets in files.items():
        packages[package(a)] |= {package(b) for b in targets if package(b) != package(a)}
    return files, dict(packages)


def describe(groups: list[list[str]]) -> str:
    return "; ".join(" <-> ".join(g) for g in groups)


def test_library_has_no_import_circle_and_no_package_cycle():
    files, packages = graph(ROOT)
    assert len(files) > 50  # the walk found the library
    assert "lrqat_dist.checkpoint" in packages["lrqat_dist.train"]  # and its imports
    circles, cycles = strongly_connected(files), strongly_connected(packages)
    assert not circles, f"file import circles: {describe(circles)}"
    assert not cycles, f"package import cycles: {describe(cycles)}"


def test_detects_circles_through_relative_and_lazy_imports(tmp_path):
    """The check itself: a circle made of a relative import and an import inside a function, and a
    package cycle made of acyclic files, are both reported."""
    root = tmp_path / "pkg"
    for rel, text in {
        "__init__.py": "",
        "a/__init__.py": "from .one import f\n",
        "a/one.py": "def f():\n    from ..b.two import g\n    return g\n",
        "a/three.py": "",
        "b/__init__.py": "",
        "b/two.py": "from ..a import three\nimport pkg.a.one\n\ndef g():\n    return 1\n",
        "c.py": "from pkg.b import two\n",
    }.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    files, packages = graph(root)
    assert files["pkg.a.one"] == {"pkg.b.two"} and files["pkg.b.two"] == {"pkg.a.three", "pkg.a.one"}
    assert files["pkg.c"] == {"pkg.b.two"} and files["pkg.a"] == {"pkg.a.one"}
    assert strongly_connected(files) == [["pkg.a.one", "pkg.b.two"]]
    assert strongly_connected(packages) == [["pkg.a", "pkg.b"]]
    (root / "b/two.py").write_text("from ..a import three\n")  # files acyclic; packages a <-> b still
    files, packages = graph(root)
    assert strongly_connected(files) == [] and strongly_connected(packages) == [["pkg.a", "pkg.b"]]
