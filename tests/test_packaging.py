"""What the wheel declares and ships, checked from the source tree (the slow test_wheel.py
installs the built wheel): every third-party module our packages import is a declared
dependency, `infergate bench` names its extra when that is missing, the files the commands
read are package data, and `make` checks the Python version before anything else."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from infergw import cli
from infergw.stack import resources
from tests.paths import ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
PACKAGE_DIRS: dict[str, str] = PYPROJECT["tool"]["setuptools"]["package-dir"]
# Imported but declared elsewhere, each with its reason.
ELSEWHERE = {
    "botocore": "comes with boto3 (the s3 extra)",
    "numba": "bench kvindex_floor alone, which says to install it",
    "rich": "the status extra: infergate status's screen, which says to install it",
}
# A namespace shared by several distributions: the part we import names ours.
NAMESPACED = {"google.protobuf": "protobuf"}


def _name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9._-]+", requirement)
    assert match, requirement
    return re.sub(r"[-_.]+", "-", match.group(0)).lower()


def declared(*extras: str) -> set[str]:
    names = {_name(r) for r in PROJECT["dependencies"]}
    for extra in extras:
        names |= {_name(r) for r in PROJECT["optional-dependencies"][extra]}
    return names


def third_party_imports(folder: Path) -> dict[str, set[str]]:
    """module -> the files importing it, for the modules neither ours nor the stdlib's."""
    found: dict[str, set[str]] = {}
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in ("infergw", "__future__"):
                    continue
                key = ".".join(name.split(".")[:2]) if top == "google" else top
                found.setdefault(key, set()).add(str(path.relative_to(ROOT)))
    return found


def undeclared(package: str, allowed: set[str]) -> dict[str, set[str]]:
    distributions = importlib.metadata.packages_distributions()
    missing = {}
    for module, files in third_party_imports(ROOT / PACKAGE_DIRS[package]).items():
        if module in ELSEWHERE:
            continue
        names = [NAMESPACED[module]] if module in NAMESPACED else distributions.get(module, [])
        if not {_name(n) for n in names} & allowed:
            missing[module] = files
    return missing


@pytest.mark.parametrize("package", sorted(p for p in PACKAGE_DIRS if p != "infergw.bench"))
def test_the_parts_import_only_declared_dependencies(package: str) -> None:
    allowed = declared("s3") if package == "infergw.fetch" else declared()
    assert undeclared(package, allowed) == {}


def test_the_benchmarks_import_only_declared_dependencies() -> None:
    assert undeclared("infergw.bench", declared("bench", "bench-routers")) == {}


def test_the_bench_extra_brings_what_infergate_bench_checks_for() -> None:
    assert set(cli.BENCH_EXTRA_MODULES) <= declared("bench")


def test_infergate_bench_without_its_extra_says_which_to_install(monkeypatch, capsys) -> None:
    monkeypatch.setattr(cli, "missing_bench_modules", lambda: ["matplotlib"])
    assert cli.main(["bench", "kvindex"]) == cli.BENCH_EXTRA_MISSING
    assert "pip install 'infergw[bench]'" in capsys.readouterr().err


def test_infergate_bench_from_an_installed_wheel_says_it_needs_a_checkout(
    tmp_path, monkeypatch, capsys
) -> None:
    from infergw.bench import common

    monkeypatch.setattr(common, "ROOT", tmp_path)  # site-packages/infergw: no pyproject.toml
    assert cli.main(["bench", "kvindex"]) == cli.BENCH_NEEDS_CHECKOUT
    assert "runs from a checkout" in capsys.readouterr().err


def test_the_files_the_commands_read_are_package_data() -> None:
    """Each folder resources.py reads from is a package of pyproject.toml whose package-data
    covers every file the folder holds (the wheel test checks the built wheel too)."""
    data = PYPROJECT["tool"]["setuptools"]["package-data"]
    for path in (resources.QUICKSTART / "model.yaml", resources.ENVOY_TEMPLATE):
        assert path.is_file(), path
    for package in ("infergw.examples", "infergw.gateway_manifests", "infergw.crds"):
        folder = ROOT / PACKAGE_DIRS[package]
        files = {p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
        covered = {p for pattern in data[package] for p in folder.glob(pattern)}
        assert files - covered == {folder / "__init__.py"}, package


def test_the_license_is_an_spdx_expression() -> None:
    assert PROJECT["license"] == "Apache-2.0"
    assert PROJECT["license-files"] == ["LICENSE"]
    assert "setuptools>=77" in PYPROJECT["build-system"]["requires"]


@pytest.mark.skipif(shutil.which("make") is None, reason="no make here")
def test_make_up_on_an_old_python_says_which_and_how_to_get_another(tmp_path) -> None:
    """macOS's python3 is 3.9: `make up` stops before making .venv, naming it."""
    for name in ("Makefile", "pyproject.toml", "tools/check_python.sh"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        shutil.copy2(ROOT / name, tmp_path / name)
    old = tmp_path / "python3.9"
    old.write_text(
        '#!/bin/sh\ncase "$2" in *version_info*) exit 1;; *python_version*) echo 3.9.6;; esac\n'
    )
    old.chmod(0o755)
    r = subprocess.run(
        ["make", "up", f"PYTHON={old}"], cwd=tmp_path, capture_output=True, text=True
    )
    assert r.returncode != 0
    assert f"PYTHON={old} is Python 3.9.6 at {old}" in r.stderr, r.stderr
    assert "make up PYTHON=python3.12" in r.stderr
    assert not (tmp_path / ".venv").exists()
