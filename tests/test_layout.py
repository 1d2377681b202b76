"""Imports and look-ups run one way (docs/design.md, the layering section): every module of
raydist belongs to a layer, and names raydist modules of lower layers only (or of its own
top-level package). A strategy never names another strategy."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PKG = Path(__file__).resolve().parents[1] / "raydist"
LAYER = {"errors": 0, "figures": 1, "steptime": 1, "registry": 1, "strategies": 2, "optim": 3, "data": 3,
         "tracking": 3, "models": 4, "config": 5, "memory": 6, "runtime": 6, "engine": 7, "raytrain": 8,
         "strategies.*": 9, "train": 10, "plan": 10, "sweep": 11, "report": 12, "cli": 13}
"""A top-level package's layer; "pkg.*" gives its submodules another one: `raydist.strategies`
itself (the registry, which imports nothing above raydist.registry) sits low, so that config
checks names against it, while the strategies it names sit above the engine."""

LOOKUP = re.compile(r"raydist(\.\w+)*:\w+")
"""A string constant naming an object by module path ("raydist.models:MODELS"), resolved by
importlib at run time: a dependency the import lines do not show."""

def module_of(path: Path, pkg: Path = PKG) -> str:
    return ".".join(path.relative_to(pkg.parent).with_suffix("").parts).removesuffix(".__init__")


def layer_of(module: str, layers: dict[str, int]) -> int:
    parts = module.split(".")
    return layers.get(f"{parts[1]}.*", layers[parts[1]]) if len(parts) > 2 else layers[parts[1]]


def is_type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def named(tree: ast.AST) -> set[str]:
    """The raydist modules `tree` imports or looks up by string. An `if TYPE_CHECKING:` block
    is skipped: it never runs, so an annotation may name a higher layer (models annotate with
    config's RunSpec, which imports them)."""
    found: set[str] = set()
    for node in ast.iter_child_nodes(tree):
        if is_type_checking(node):
            found |= set().union(*(named(n) for n in node.orelse)) if node.orelse else set()
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("raydist"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("raydist"))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and LOOKUP.fullmatch(node.value):
            found.add(node.value.split(":")[0])
        found |= named(node)
    return found


def strategy_names(pkg: Path) -> set[str]:
    folder = pkg / "strategies"
    if not folder.is_dir():
        return set()
    return ({p.stem for p in folder.glob("*.py") if p.stem != "__init__"}
            | {p.name for p in folder.iterdir() if (p / "__init__.py").exists()})


def wrong(me: str, target: str, layers: dict[str, int], strategies: set[str]) -> bool:
    """Whether module `me` may not name `target`. Importing a.b.c runs a.b's __init__ too,
    so the target counts at the highest layer of its packages."""
    parts = target.split(".")
    if len(parts) < 2 or parts[1] not in layers:
        return False
    if parts[1] == me.split(".")[1]:
        # inside the strategies package only its __init__ (the registry) names the strategies;
        # a strategy names only its own modules
        mine = me.split(".")[2] if len(me.split(".")) > 2 else None
        return parts[1] == "strategies" and len(parts) >= 3 and parts[2] in strategies and mine not in (
            None, parts[2])
    chain = [".".join(parts[:i]) for i in range(2, len(parts) + 1) if ".".join(parts[:i]) != me]
    return max(layer_of(m, layers) for m in chain) >= layer_of(me, layers)


def is_module(name: str, pkg: Path) -> bool:
    """Whether `name` is a module of `pkg` (not a name `from module import name` takes)."""
    path = pkg.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def violations(pkg: Path = PKG, layers: dict[str, int] = LAYER) -> dict[str, list[str]]:
    """module -> the raydist modules it names against the layers."""
    strategies = strategy_names(pkg)
    out: dict[str, list[str]] = {}
    for path in sorted(pkg.rglob("*.py")):
        me = module_of(path, pkg)
        if me == "raydist":
            continue
        modules = {t for t in named(ast.parse(path.read_text())) if is_module(t, pkg)}
        bad = sorted(t for t in modules if wrong(me, t, layers, strategies))
        if bad:
            out[me] = bad
    return out


def test_every_module_has_a_layer():
    tops = {module_of(p).split(".")[1] for p in PKG.rglob("*.py") if module_of(p) != "raydist"}
    assert tops <= set(LAYER), tops - set(LAYER)


def test_imports_and_lookups_only_point_down():
    assert violations() == {}


def test_the_check_fails_on_an_upward_lookup_or_import(tmp_path):
    pkg = tmp_path / "raydist"
    files = {"__init__.py": "",
             "config/__init__.py": 'from typing import TYPE_CHECKING\nMODELS = "raydist.models:MODELS"\n'
                                   'if TYPE_CHECKING:\n    from raydist.engine import Report\n',
             "config/run.py": 'def check():\n    return "raydist.engine.lr:LR_SCHEDULES"\n',
             "models/__init__.py": "from raydist.engine import fit\n",
             "engine/__init__.py": "from raydist.config import RunSpec\n",
             "engine/lr.py": "",
             "strategies/__init__.py": 'ALL = ["raydist.strategies.ddp:run"]\n',
             "strategies/ddp/__init__.py": 'R = "raydist.strategies.ddp.worker:R"\n',
             "strategies/ddp/worker.py": 'P = "raydist.strategies.ps:run"\n',
             "strategies/ps/__init__.py": ""}
    for name, text in files.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(text)
    layers = {"strategies": 0, "models": 1, "config": 2, "engine": 3, "strategies.*": 4}
    assert violations(pkg, layers) == {"raydist.config.run": ["raydist.engine.lr"],
                                       "raydist.models": ["raydist.engine"],
                                       "raydist.strategies.ddp.worker": ["raydist.strategies.ps"]}


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
    their registries and which strategies run on Ray: none of that may pull in Ray."""
    import subprocess
    import sys

    code = ("import sys; import raydist.strategies.ddp.comm, raydist.strategies.pipeline.cuts, "
            "raydist.strategies.pipeline.schedules, raydist.strategies.ps.sharding, "
            "raydist.strategies.ps.staleness, raydist.strategies.tp.parallelize, "
            "raydist.strategies.tp.shards, raydist.plan, raydist.config; "
            "from raydist.config import RunSpec; RunSpec.from_dict({'strategy': 'ddp'}); "
            "RunSpec.from_dict({'strategy': 'pipeline'}).refuse_unread(); "
            "print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr
