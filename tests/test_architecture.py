"""The package's layering and the size of its rooms (docs/ARCHITECTURE.md).

Imports may only go down the layers below (a lazy import inside a function counts too): a source
format never imports a transform, the output, runs, the API or the CLI. Modules stay under about
600 lines and functions under about 100, so that each room can be read whole.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "python" / "fastckpt"

#: lowest first; a module may import its own layer and those before it
LAYERS: tuple[tuple[str, ...], ...] = (
    ("_core", "catalog", "safeio", "fsops", "side_files"),
    ("unpickle",),
    ("formats",),
    ("transforms",),
    ("output",),
    ("runs",),
    ("pipeline", "checkpoint", "cluster"),
    ("api",),
    ("cli",),
)
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 100


def _layer(dotted: str) -> int:
    """Layer of ``fastckpt.X...`` (X a module or a package)."""
    top = dotted.split(".")[1]
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"fastckpt.{top} is in no layer: add it to LAYERS and ARCHITECTURE.md")


def _modules() -> list[tuple[str, Path]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        if parts == ["fastckpt"]:  # the façade: lazy re-exports of the public API
            continue
        found.append((".".join(parts), path))
    return found


def _imports(path: Path, module: str) -> list[tuple[int, str]]:
    """Every ``fastckpt`` module imported anywhere in the file, with its line."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("fastckpt.")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            if base == "fastckpt":
                out += [(node.lineno, f"fastckpt.{a.name}") for a in node.names]
            elif base.startswith("fastckpt."):
                out.append((node.lineno, base))
    return out


def test_every_module_is_in_a_layer() -> None:
    for module, _ in _modules():
        _layer(module)


def test_imports_only_go_down_the_layers() -> None:
    upward = []
    for module, path in _modules():
        own = _layer(module)
        for line, target in _imports(path, module):
            if _layer(target) > own:
                upward.append(f"{path.relative_to(PACKAGE)}:{line} imports {target}")
    assert not upward, "imports running up the layers:\n" + "\n".join(upward)


@pytest.mark.parametrize("module,path", _modules(), ids=[m for m, _ in _modules()])
def test_rooms_stay_small(module: str, path: Path) -> None:
    text = path.read_text()
    assert text.count("\n") <= MAX_MODULE_LINES, f"{module}: split it (see ARCHITECTURE.md)"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            assert length <= MAX_FUNCTION_LINES, f"{module}.{node.name}: {length} lines"
