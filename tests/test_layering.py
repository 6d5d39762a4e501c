"""The house's layering, read from the source: kernels/ is a leaf that imports torch only, engines/ never reaches up
into evals/ or studio/, studio/ never imports torch, and no first-party modules import each other in a cycle (lazy
imports inside functions count too)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("engines", "kernels", "studio", "evals", "demo_world")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module an `import` or `from ... import` anywhere in the file names (relative imports resolved)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return found


def first_party_graph() -> dict[str, set[str]]:
    files = [p for package in PACKAGES for p in (ROOT / package).rglob("*.py")]
    modules = {module_name(p): p for p in files}
    return {name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()}


def test_kernels_import_only_torch_and_the_standard_library():
    for path in (ROOT / "kernels").rglob("*.py"):
        third_party = {m.split(".")[0] for m in imports_of(path)} - set(sys.stdlib_module_names) - {"__future__"}
        assert third_party <= {"torch", "kernels"}, f"{path.name} imports {third_party}"


def test_engines_never_import_evals_or_studio_and_studio_never_imports_torch():
    for path in (ROOT / "engines").rglob("*.py"):
        assert not {m.split(".")[0] for m in imports_of(path)} & {"evals", "studio", "gradio"}, path
    for path in (ROOT / "studio").rglob("*.py"):
        assert "torch" not in {m.split(".")[0] for m in imports_of(path)}, path


def test_no_import_cycles():
    graph = first_party_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != 1, "import cycle: " + " → ".join(path[path.index(nxt) :] + [node, nxt])
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
