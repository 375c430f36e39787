"""The walls between the parts (docs/development.md, its section on the import walls),
checked on every import statement — lazy ones inside functions included, and through any
chain of the project's own modules:

* the core (``mloptimizer/`` but ``app/``) imports neither the trainer, the operator, the
  application layer, kopf nor TensorFlow;
* the trainer imports neither the operator, the application layer nor kopf;
* the operator imports neither the trainer, the application layer nor TensorFlow;
* only the application layer (``mloptimizer/app/``) composes them.

(import-linter would say the same, but it cannot see ``mloptimizer.operator``: a namespace
package, so that no ``operator`` package ever shadows the standard library's.)

And the sizes: no product module (``mloptimizer/``, ``operator/``, ``trainer/``) over
:data:`MODULE_LINES` lines, no class there over :data:`CLASS_LINES` (the rule is ~600 and
~300: past that a module or class holds more than one thing, and is split along its seams).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"mloptimizer": ROOT / "mloptimizer", "mloptimizer.operator": ROOT / "operator",
           "mloptimizer.trainer": ROOT / "trainer"}  # fmt: skip

TF = ("tensorflow", "keras")
WALLS = {
    "core": ("mloptimizer.trainer", "mloptimizer.operator", "mloptimizer.app", "kopf", *TF),
    "trainer": ("mloptimizer.operator", "mloptimizer.app", "kopf"),
    "operator": ("mloptimizer.trainer", "mloptimizer.app", *TF),
}

MODULE_LINES = 600
CLASS_LINES = 320


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            found[name] = path
    return found


def part_of(module: str) -> str:
    if module.startswith("mloptimizer.app"):
        return "app"
    if module.startswith(("mloptimizer.operator", "mloptimizer.trainer")):
        return module.split(".")[1]
    return "core"


def imports_of(module: str, path: Path) -> set[str]:
    """Every module an import statement of ``path`` names, wherever the statement is."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base]) if base else ".".join(parent)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def reaches(start: str, graph: dict[str, set[str]]) -> dict[str, list[str]]:
    """Every name reachable from ``start`` through the project's modules, with a path."""
    paths: dict[str, list[str]] = {start: [start]}
    todo = [start]
    while todo:
        current = todo.pop()
        for name in graph.get(current, ()):
            if name not in paths:
                paths[name] = [*paths[current], name]
                if name in graph:
                    todo.append(name)
    return paths


def violations() -> list[str]:
    found = modules()
    graph = {name: imports_of(name, path) for name, path in found.items()}
    problems = []
    for name in sorted(found):
        wall = WALLS.get(part_of(name))
        if wall is None:
            continue
        for target, path in reaches(name, graph).items():
            if any(target == w or target.startswith(w + ".") for w in wall):
                problems.append(f"{name} reaches {target}: {' -> '.join(path)}")
                break
    return problems


def test_the_parts_keep_their_walls() -> None:
    assert violations() == []


def test_the_check_sees_lazy_imports_and_chains(tmp_path: Path) -> None:
    source = "def f():\n    from mloptimizer.trainer.local import serve\n"
    (tmp_path / "lazy.py").write_text(source)
    assert "mloptimizer.trainer.local" in imports_of("mloptimizer.lazy", tmp_path / "lazy.py")
    graph = {"mloptimizer.a": {"mloptimizer.b"}, "mloptimizer.b": {"kopf"}}
    assert reaches("mloptimizer.a", graph)["kopf"] == ["mloptimizer.a", "mloptimizer.b", "kopf"]
    relative = tmp_path / "rel.py"
    relative.write_text("from .space import Architecture\nfrom . import spec\n")
    assert {"mloptimizer.space", "mloptimizer.spec"} <= imports_of("mloptimizer.rel", relative)


@pytest.mark.parametrize("part", ["core", "trainer", "operator", "app"])
def test_every_part_has_modules(part: str) -> None:
    assert any(part_of(name) == part for name in modules())


def oversized(found: dict[str, Path]) -> list[str]:
    """Each module over :data:`MODULE_LINES` lines and each class over :data:`CLASS_LINES`
    (from its ``class`` line to its last), named with its size and the limit."""
    problems = []
    for name, path in sorted(found.items()):
        source = path.read_text()
        lines = len(source.splitlines())
        if lines > MODULE_LINES:
            problems.append(f"module {name} has {lines} lines, over the limit of {MODULE_LINES}")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ClassDef) and node.end_lineno is not None:
                size = node.end_lineno - node.lineno + 1
                if size > CLASS_LINES:
                    problems.append(
                        f"class {name}.{node.name} has {size} lines, over the limit of "
                        f"{CLASS_LINES}: split it along its seams"
                    )
    return problems


def test_no_module_or_class_is_over_its_size_limit() -> None:
    assert oversized(modules()) == []


def test_the_size_check_names_what_is_too_long_and_the_limit(tmp_path: Path) -> None:
    body = "".join(f"    x{i} = {i}\n" for i in range(CLASS_LINES - 1))
    (tmp_path / "fits.py").write_text(f"class Fits:\n{body}")  # exactly CLASS_LINES
    (tmp_path / "big.py").write_text(f"class Big:\n{body}    last = 0\n\n\ndef f():\n    pass\n")
    (tmp_path / "long.py").write_text("x = 1\n" * (MODULE_LINES + 1))
    found = {f"mloptimizer.{p.stem}": p for p in tmp_path.glob("*.py")}
    assert oversized(found) == [
        f"class mloptimizer.big.Big has {CLASS_LINES + 1} lines, over the limit of "
        f"{CLASS_LINES}: split it along its seams",
        f"module mloptimizer.long has {MODULE_LINES + 1} lines, over the limit of {MODULE_LINES}",
    ]
