"""The launcher sits on top: `stack/` (the local stack library) and `bench/` never import
the launcher (`infergate/`: cli.py, up.py, imported as `infergw.cli`, `infergw.up`), and the
launcher finds benchmarks by name, so the arrows run one way. Each check imports in a fresh
interpreter, outside the repository (so no bare folder can be imported by accident), where
sys.modules shows what really loaded."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from infergw.cli import BENCHMARKS
from tools.rename_namespace import DEFAULT_NS, SUBPACKAGES

# Every module of the packages, except `__main__`s (importing one runs its benchmark).
IMPORT_ALL = """
import importlib, json, pkgutil, sys
for name in sys.argv[1:]:
    pkg = importlib.import_module(name)
    for m in pkgutil.walk_packages(pkg.__path__, name + "."):
        if not m.name.endswith(".__main__"):
            importlib.import_module(m.name)
print(json.dumps(sorted(sys.modules)))
"""


def modules_after_importing(*packages: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", IMPORT_ALL, *packages],
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


def of(package: str, modules: list[str]) -> list[str]:
    return [m for m in modules if m == package or m.startswith(package + ".")]


# Folders shipped as data under the namespace (stack/resources.py reads them): no code, so
# never the launcher's, though the rename tool does not list them among the code packages.
DATA_PACKAGES = ("examples", "gateway_manifests", "crds")


def launcher_modules(modules: list[str]) -> list[str]:
    """The launcher's own modules: the namespace's, outside every folder mapped under it."""
    mapped = {*SUBPACKAGES, *DATA_PACKAGES}
    return [m for m in of(DEFAULT_NS, modules) if m.count(".") and m.split(".")[1] not in mapped]


@pytest.mark.parametrize("package", ["stack", "bench"])
def test_stack_and_bench_never_import_the_launcher(package):
    loaded = modules_after_importing(f"{DEFAULT_NS}.{package}")
    assert of(f"{DEFAULT_NS}.{package}", loaded), f"{package} did not import"
    assert launcher_modules(loaded) == []


def test_the_launcher_imports_no_benchmark_until_one_is_run():
    loaded = modules_after_importing(DEFAULT_NS)
    assert {f"{DEFAULT_NS}.cli", f"{DEFAULT_NS}.up"} <= set(launcher_modules(loaded))
    assert of(f"{DEFAULT_NS}.bench", loaded) == []


def test_every_benchmark_name_is_a_module_with_a_main():
    probe = (
        "import importlib, json, sys; "
        "print(json.dumps([callable(importlib.import_module(m).main) for m in sys.argv[1:]]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, *BENCHMARKS.values()],
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1]) == [True] * len(BENCHMARKS)


@pytest.mark.parametrize("args", [["bench"], ["bench", "no-such-benchmark"]])
def test_bench_without_a_known_name_lists_the_names(args):
    out = subprocess.run(
        [sys.executable, "-m", "infergw.cli", *args], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2
    said = out.stdout + out.stderr  # the usage (no name), or what to run instead (a wrong one)
    assert said.startswith("usage: infergate bench") or "infergate bench --help" in said
    assert all(name in said for name in BENCHMARKS)
