"""quailora's import graph, read from the source (every import statement, TYPE_CHECKING and function-level
ones included): the group-wise quantizer never imports QA-LoRA, and no module imports itself back."""

import ast
from pathlib import Path

import quailora

ROOT = Path(quailora.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(path: Path) -> set[str]:
    """Every dotted name an import statement of ``path`` can load (``from a import b``: a and a.b)."""
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(path): path for path in ROOT.rglob("*.py")}
    return {name: (_imported(path) & modules.keys()) - {name} for name, path in modules.items()}


def test_groupwise_quantizer_never_imports_qalora():
    graph = _graph()
    groupwise = [name for name in graph if name.startswith("quailora.quantizers.groupwise")]
    assert "quailora.quantizers.groupwise.layer" in groupwise, "the base layer lives in the quantizer package"
    offending = {
        name: sorted(dep for dep in graph[name] if dep.startswith("quailora.qalora")) for name in groupwise
    }
    assert not any(offending.values()), f"quailora.quantizers.groupwise imports quailora.qalora: {offending}"


def test_quailora_has_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = 1
        path.append(name)
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                return path[path.index(dep) :] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        state[name] = 2
        path.pop()
        return None

    for name in sorted(graph):
        if name not in state:
            cycle = visit(name)
            assert cycle is None, "import cycle: " + " -> ".join(cycle)


# Each installed package imports only the ones below it: orchestrator -> trials -> reference -> quailora;
# none imports the top-level testkit/ (tests', scripts' and benchmarks' shared code) or tests/.
MAY_IMPORT = {
    "quailora": set(),
    "reference": {"quailora"},
    "trials": {"quailora", "reference"},
    "orchestrator": {"quailora", "reference", "trials"},
}


def test_packages_import_only_downward():
    others = set(MAY_IMPORT) | {"testkit", "tests"}
    offending = {}
    for package, allowed in MAY_IMPORT.items():
        for path in sorted((ROOT.parent / package).rglob("*.py")):
            upward = {name.split(".")[0] for name in _imported(path)} & (others - allowed - {package})
            if upward:
                offending[_module_name(path)] = sorted(upward)
    assert not offending, f"imports against the layering: {offending}"
