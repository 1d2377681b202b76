"""Imports run one way (docs/design.md, the layering section): cli -> sweep/report -> strategies ->
engine -> models/data/optim/config. A strategy never imports another strategy."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PKG = Path(__file__).resolve().parents[1] / "raydist"
LAYER = {"registry": 0, "config": 1, "faults": 1, "checkpoint": 1, "staleness": 1, "optim": 2, "data": 2,
         "models": 3, "engine": 4, "cluster": 4, "comm": 4, "pipelining": 4, "sharding": 4, "strategies": 5,
         "calibration": 5, "plan": 6, "sweep": 6, "report": 7, "cli": 8}


def raydist_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("raydist"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("raydist"))
    return found


def module_of(path: Path) -> str:
    return ".".join(path.relative_to(PKG.parent).with_suffix("").parts).removesuffix(".__init__")


def test_every_module_has_a_layer():
    tops = {module_of(p).split(".")[1] for p in PKG.rglob("*.py") if module_of(p) != "raydist"}
    assert tops <= set(LAYER), tops - set(LAYER)


def test_imports_only_point_down():
    for path in PKG.rglob("*.py"):
        me = module_of(path)
        if me == "raydist":
            continue
        mine = LAYER[me.split(".")[1]]
        for target in raydist_imports(path):
            parts = target.split(".")
            if len(parts) < 2 or parts[1] not in LAYER:
                continue
            if parts[1] == me.split(".")[1]:
                # within the strategies package only __init__ (the registry) imports the strategies
                assert path.name == "__init__.py" or len(parts) < 3 or parts[2] not in _strategies(), \
                    f"{me} imports {target}"
                continue
            assert LAYER[parts[1]] < mine, f"{me} imports {target} against the direction in docs/design.md"


def _strategies() -> set[str]:
    return {p.stem for p in (PKG / "strategies").glob("*.py") if p.stem != "__init__"}
