"""Imports run one way (docs/design.md, the layering section): cli -> sweep/report -> strategies ->
engine -> models/data/optim/config. A strategy never imports another strategy."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PKG = Path(__file__).resolve().parents[1] / "raydist"
LAYER = {"errors": 0, "figures": 1, "registry": 1, "steptime": 1, "config": 2, "optim": 3, "data": 3,
         "tracking": 3, "models": 4, "memory": 5, "runtime": 5, "engine": 6, "raytrain": 7, "strategies": 8,
         "plan": 9, "sweep": 10, "report": 11, "cli": 12}


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
                # within the strategies package only its __init__ (the registry) imports the
                # strategies; a strategy imports only its own modules
                mine_ = me.split(".")[2] if len(me.split(".")) > 2 else None
                if len(parts) >= 3 and parts[2] in _strategies() and me != "raydist.strategies":
                    assert parts[2] == mine_, f"{me} imports {target}"
                continue
            assert LAYER[parts[1]] < mine, f"{me} imports {target} against the direction in docs/design.md"


def _strategies() -> set[str]:
    folder = PKG / "strategies"
    return ({p.stem for p in folder.glob("*.py") if p.stem != "__init__"}
            | {p.name for p in folder.iterdir() if (p / "__init__.py").exists()})


def test_no_two_public_classes_share_a_name():
    """One name, one meaning: a class name says which class it is, wherever it is read."""
    where: dict[str, list[str]] = {}
    for path in sorted(PKG.rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                where.setdefault(node.name, []).append(module_of(path))
    assert {name: mods for name, mods in where.items() if len(mods) > 1} == {}


def test_strategy_pure_pieces_import_without_ray():
    """plan and calibration use the cuts, schedules and byte counts; RunSpec's validation reads
    their registries: none of that may pull in Ray."""
    import subprocess
    import sys

    code = ("import sys; import raydist.strategies.ddp.comm, raydist.strategies.pipeline.cuts, "
            "raydist.strategies.pipeline.schedules, raydist.strategies.ps.sharding, "
            "raydist.strategies.ps.staleness, raydist.strategies.tp.parallelize, "
            "raydist.strategies.tp.shards, raydist.plan, raydist.config; "
            "from raydist.config import RunSpec; RunSpec.from_dict({'strategy': 'ddp'}); "
            "print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr
