"""The import rules of docs/architecture.md: each package stands on the floors below it only.

Each package is imported (every module of it) in a fresh interpreter, and the set of our
packages that ends up in `sys.modules` must lie within its floor. Today's names apply until the
namespace rename (tools/rename_namespace.py) lands; once `infergw` is importable the same table
is checked under it, plus the rename's own guard: no bare `epp`/`controllers`/... import or
`-m <bare>` anywhere, and importing every namespaced module loads no bare copy (a second copy
means duplicate Prometheus collectors and split singletons).
"""

from __future__ import annotations

import ast
import importlib.util
import itertools
import json
import subprocess
import sys

import pytest

from tests.paths import ROOT
from tools.rename_namespace import DEFAULT_NS, LAUNCHER, SUBPACKAGES

# package -> the packages it may import (plan §5). The launcher may import anything at call time
# (it starts the parts); at import time it stands on the stack only.
FLOORS: dict[str, set[str]] = {
    "api": set(),
    "cluster": {"api"},
    "kvindex": {"api"},
    # The simulator and fetch stand alone, but for the floor's shared conventions: the log
    # format, flags and request fields (api/logs.py, api/log_context.py), the version
    # (api/version.py) and, for the simulator, its spans (api/tracing.py), as every process has.
    "simulator": {"api"},
    # Run in the picker's init container.
    "fetch": {"api"},
    # Beside an engine: its adapters file (api) and the weights downloads (fetch).
    "runtime": {"api", "fetch"},
    "epp": {"api", "cluster", "kvindex"},
    # The weights download's progress lines (fetch/progress.py) and the URIs a tokenizer is
    # fetched from (fetch/tokenizer.py): read where fetch writes and defines them.
    "controllers": {"api", "cluster", "fetch"},
    "connector": {"api", "cluster"},
    # The body-based router reads bodies and routes as the picker does, with its code
    # (epp/request_body.py, epp/routing/): it stands beside the stack, above the picker.
    "bbr": {"api", "cluster", "epp"},
    # The stack starts the controllers and the picker as processes and makes the certificate
    # the picker serves with (cluster.certs): a downward import, never the other way.
    "stack": {"api", "cluster", "fetch"},
    # bench pd checks its --pd-params with the picker's own config loader before a fleet
    # starts; fetch comes with the stack.
    "bench": {"stack", "api", "cluster", "kvindex", "simulator", "epp", "fetch"},
    "launcher": {"stack"},
}
RENAMED = importlib.util.find_spec(DEFAULT_NS) is not None


ROOT_PACKAGE = DEFAULT_NS if RENAMED else LAUNCHER


# Packages of data alone (the files the commands read, stack/resources.py): no code, no floor.
DATA_PACKAGES = frozenset({"examples", "gateway_manifests", "crds"})


def floor_of(module: str) -> str | None:
    """The floor a loaded module belongs to; None for what is not ours (or the bare root)."""
    parts = module.split(".")
    if not RENAMED and parts[0] in SUBPACKAGES:
        return parts[0]
    if parts[0] != ROOT_PACKAGE or len(parts) == 1 or parts[1] in DATA_PACKAGES:
        return None
    return parts[1] if parts[1] in SUBPACKAGES else "launcher"


def modules_of(floor: str) -> list[str]:
    """Every importable module of a floor, under the names that apply today."""
    if floor == "launcher":
        return [f"{ROOT_PACKAGE}.cli"]
    folder = ROOT / floor
    if not (folder / "__init__.py").exists():
        return []
    found = []
    for path in sorted(folder.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        if rel.name == "__main__":
            continue
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        found.append(".".join((DEFAULT_NS, *parts) if RENAMED else parts))
    return found


def loaded_floors(modules: list[str]) -> dict[str, list[str]]:
    """floor -> our modules loaded by importing `modules` in a fresh interpreter."""
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=True
    )
    loaded: dict[str, list[str]] = {}
    for name in json.loads(out.stdout):
        floor = floor_of(name)
        if floor is not None:
            loaded.setdefault(floor, []).append(name)
    return loaded


# Rules that become true as #20's work packages land; each switches on by what it waits for.
def pending(floor: str) -> str | None:
    if floor in ("stack", "bench", "launcher") and not (ROOT / "stack").is_dir():
        return "the local stack still imports the picker and controllers (until WP-STACK: stack/)"
    return None


@pytest.mark.parametrize("floor", sorted(FLOORS))
def test_each_package_imports_only_its_floors(floor: str) -> None:
    if reason := pending(floor):
        pytest.skip(reason)
    modules = modules_of(floor)
    if not modules:
        pytest.skip(f"{floor}/ does not exist yet")
    loaded = loaded_floors(modules)
    above = {f: names for f, names in loaded.items() if f != floor and f not in FLOORS[floor]}
    assert above == {}, f"{floor} may import only {sorted(FLOORS[floor])}"


def imported_floors(path) -> set[str]:
    """The floors a source file imports anywhere, in functions too (where an import waits
    until it runs, and the check above cannot see it)."""
    tree = ast.parse(path.read_text(), str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == ROOT_PACKAGE:  # `from infergw import api` imports infergw.api
                names += [f"{node.module}.{a.name}" for a in node.names]
            else:
                names.append(node.module)
    floors = {floor_of(n) or floor_of(n.split(".")[0] + ".x") for n in names}
    return floors - {None}


# Imports in functions that break a floor today, each until its name moves to api/names.py.
KNOWN_LATE_IMPORTS: dict[str, str] = {}


# The launcher imports each part when its command runs, by design.
@pytest.mark.parametrize(
    "floor",
    [
        pytest.param(f, marks=pytest.mark.xfail(reason=KNOWN_LATE_IMPORTS[f], strict=True))
        if f in KNOWN_LATE_IMPORTS
        else f
        for f in sorted(set(FLOORS) - {"launcher"})
    ],
)
def test_no_source_imports_above_its_floor_even_in_a_function(floor: str) -> None:
    if reason := pending(floor):
        pytest.skip(reason)
    folder = ROOT / floor
    if not folder.is_dir():
        pytest.skip(f"{floor}/ does not exist yet")
    allowed = FLOORS[floor] | {floor}
    found = {
        f"{path.relative_to(ROOT)}: {sorted(imported_floors(path) - allowed)}"
        for path in sorted(folder.rglob("*.py"))
        if imported_floors(path) - allowed
    }
    assert found == set(), f"{floor} may import only {sorted(FLOORS[floor])}"


BARE = {*SUBPACKAGES, LAUNCHER}  # after the rename the launcher folder is `infergw` too


def bare_imports(path) -> list[str]:
    """`import epp...` / `from epp... import` and `"-m", "epp..."` in one file."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.List | ast.Tuple):
            items = [e.value if isinstance(e, ast.Constant) else None for e in node.elts]
            names = [str(b) for a, b in itertools.pairwise(items) if a == "-m" and b]
        else:
            continue
        found += [
            f"{path.relative_to(ROOT)}:{node.lineno}: {n}" for n in names if n.split(".")[0] in BARE
        ]
    return found


@pytest.mark.skipif(not RENAMED, reason=f"the {DEFAULT_NS} namespace rename has not landed yet")
def test_no_source_names_a_bare_package() -> None:
    skip = {".venv", ".git", "fixtures", "build"}
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        if skip.isdisjoint(path.relative_to(ROOT).parts):
            found += bare_imports(path)
    assert found == []


@pytest.mark.skipif(not RENAMED, reason=f"the {DEFAULT_NS} namespace rename has not landed yet")
def test_importing_every_namespaced_module_loads_no_bare_copy() -> None:
    modules = [m for floor in FLOORS for m in modules_of(floor)]
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {sorted(BARE)!r}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=True
    )
    assert out.stdout.strip() == "[]"
