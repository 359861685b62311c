"""The package's layers only point down: no module imports one from a layer above it (no import
cycles hidden by imports inside functions)."""

from __future__ import annotations

import ast
from pathlib import Path

import rcmseg

# Lower index = lower layer. A module may import its own layer and the layers below.
LAYERS: list[set[str]] = [
    {"classes", "errors"},
    {"io"},
    {"networks", "losses", "metrics", "transforms", "splits", "report", "synth"},
    {"inference"},
    {"bundle"},
    {"training"},
    {"evaluation", "batch"},
    {"label_app", "labels_import"},
    {"cli"},
]
PACKAGE = Path(rcmseg.__file__).parent


def layer_of(module: str) -> int:
    top = module.split(".")[1] if module.startswith("rcmseg.") else ""
    for index, names in enumerate(LAYERS):
        if top in names:
            return index
    raise AssertionError(f"{module} is in no layer: add it to LAYERS")


def rcmseg_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rcmseg."):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("rcmseg.")}
    return found


def test_every_import_points_down_or_sideways():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent).with_suffix("").as_posix().replace("/", ".")
        if relative in ("rcmseg.__init__", "rcmseg"):
            continue
        own = layer_of(relative)
        for imported in rcmseg_imports(path):
            if layer_of(imported) > own:
                wrong.append(f"{relative} imports {imported}")
    assert not wrong, wrong
