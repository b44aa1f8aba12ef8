"""The package's layer order (ARCHITECTURE.md): no module imports a later layer, lazily or not, and
no modules import each other in a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "seal_gguf"
# Earlier layers never import later ones; a name matches a module and everything below it.
LAYERS = [
    ("seal_gguf.errors", "seal_gguf.constants", "seal_gguf.fileio"),
    ("seal_gguf.texts", "seal_gguf.kld", "seal_gguf.cases", "seal_gguf.task_words", "seal_gguf.tasks"),
    ("seal_gguf.gguffile",),
    ("seal_gguf.model",),
    ("seal_gguf.scales", "seal_gguf.bundled"),
    ("seal_gguf.fold",),
    ("seal_gguf.convert",),
    ("seal_gguf.measure",),
    ("seal_gguf.learn",),
    ("seal_gguf.ship",),
    ("seal_gguf.demo",),
    ("seal_gguf.cli", "seal_gguf.__main__"),
]


def module_name(path: Path) -> str:
    name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return name.removesuffix(".__init__")


def layer_of(module: str) -> int:
    for index, names in enumerate(LAYERS):
        if any(module == n or module.startswith(n + ".") for n in names):
            return index
    raise AssertionError(f"{module} is in no layer: add it to LAYERS (and to ARCHITECTURE.md)")


def imports() -> dict[str, set[str]]:
    """module -> the seal_gguf modules it imports anywhere (the package's own lazy re-exports aside)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    found: dict[str, set[str]] = {}
    for module, path in modules.items():
        if module == "seal_gguf":
            continue  # __init__ re-exports the public verbs lazily, for type checkers only
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level:  # relative: from the module's package
                package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                base = package[:len(package) - (node.level - 1)]
                name = ".".join([*base, node.module] if node.module else base)
            elif isinstance(node, ast.ImportFrom):
                name = node.module or ""
            else:
                continue
            for alias in node.names:
                full = f"{name}.{alias.name}"
                target = full if full in modules else name
                if target in modules and target != module:
                    targets.add(target)
        found[module] = targets
    return found


@pytest.mark.unit
def test_no_import_against_the_layer_order() -> None:
    wrong = [f"{m} -> {t}" for m, targets in imports().items() for t in sorted(targets)
             if t != "seal_gguf" and layer_of(t) > layer_of(m)]
    assert not wrong, "imports against the layer order: " + "; ".join(wrong)


@pytest.mark.unit
def test_no_import_cycles() -> None:
    graph = imports()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in graph.get(module, ()):
            if state.get(target) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path[path.index(target):], target]))
            if target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
