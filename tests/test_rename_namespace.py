"""tools/rename_namespace.py on a small repository laid out like ours: what it rewrites, what it
leaves alone (logger names, console-script commands, third-party modules), and that a dry run
writes nothing."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.paths import ROOT

SCRIPT = ROOT / "tools" / "rename_namespace.py"

SOURCES = {
    "infergate/__init__.py": "",
    "infergate/cli.py": '''"""Usage: python -m epp, python -m controllers."""

import controllers
from epp.app import main as epp_main
from infergate import api
from kvindex.index import KVBlockIndex


def run():
    import simulator.app as sim_app

    return [sys.executable, "-m", "simulator", "--port", "1"], ["infergate", "epp"]
''',
    "infergate/api/__init__.py": "",
    "epp/__init__.py": "",
    "epp/app.py": """import logging

from prometheus_client import Counter

log = logging.getLogger("epp.app")
CMD = (sys.executable, "-m", "epp.connector", "-m", "http.server")
SUPERVISED = "-m epp"
PROBE = "import sys, infergate.api; print(1)"
""",
    "epp/connector/__init__.py": "",
    "kvindex/__init__.py": "",
    "controllers/__init__.py": "",
    "simulator/__init__.py": "",
    "simulator/default_model/vocab.json": "{}",
    "bench/__init__.py": 'BENCHMARKS = {"soak": "bench.soak", "kvindex": "bench.kvindex"}\n',
    "tests/__init__.py": "",
    "tests/test_epp_unit_director.py": "def helper(): ...\n",
    "tests/test_epp_drain.py": (
        "from tests.test_epp_unit_director import helper\n"
        'CMD = ["-m", "tests.test_epp_unit_director"]\n'
    ),
    "Dockerfile": (
        "COPY pyproject.toml ./\nCOPY infergate ./infergate\nCOPY epp ./epp\n"
        "COPY examples ./examples\nRUN python -c 'find_spec(\"simulator\")'\n"
    ),
    "gateway-manifests/epp.yaml": (
        "# `python -m epp`; from controllers.certs import serving_cert\n"
        'command: ["infergate", "epp"]\n'
    ),
    "pyproject.toml": """[project]
name = "infergate"
version = "0"

[project.scripts]
infergate = "infergate.cli:main"

[tool.setuptools.packages.find]
include = ["infergate*", "epp*"]

[tool.setuptools.package-data]
simulator = ["default_model/*.json"]

[tool.ruff]
line-length = 100

[tool.ruff.lint.per-file-ignores]
"tests/**" = ["E501"]
""",
}


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    for rel, text in SOURCES.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (tmp_path / "tools").mkdir()
    shutil.copy(SCRIPT, tmp_path / "tools" / SCRIPT.name)
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(["git", "add", "-A"], cwd=tmp_path, check=True)
    return tmp_path


def rename(repo: Path, *flags: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    ruff = str(Path(sys.executable).parent / "ruff")
    return subprocess.run(
        [
            sys.executable,
            str(repo / "tools" / SCRIPT.name),
            "--root",
            str(repo),
            "--ruff",
            ruff,
            *flags,
        ],
        capture_output=True,
        text=True,
        check=check,
    )


def test_a_dry_run_lists_the_changes_and_writes_nothing(repo: Path) -> None:
    before = {rel: (repo / rel).read_text() for rel in SOURCES}
    out = rename(repo).stdout
    assert "would rewrite" in out and "infergate/cli.py" in out
    assert {rel: (repo / rel).read_text() for rel in SOURCES} == before


def test_imports_and_module_strings_move_under_the_namespace(repo: Path) -> None:
    rename(repo, "--apply", "--ns", "ns1")
    cli = (repo / "infergate" / "cli.py").read_text()
    assert "from ns1 import api, controllers" in cli  # ruff sorts the namespace into one block
    assert "from ns1.epp.app import main as epp_main" in cli
    assert "from ns1.kvindex.index import KVBlockIndex" in cli
    assert "import ns1.simulator.app as sim_app" in cli
    assert '"-m", "ns1.simulator"' in cli
    assert "python -m ns1.epp, python -m ns1.controllers" in cli
    assert '["infergate", "epp"]' in cli  # the console script's command stays
    app = (repo / "epp" / "app.py").read_text()
    assert 'getLogger("epp.app")' in app  # logger names are a contract, not imports
    assert '"-m", "ns1.epp.connector", "-m", "http.server"' in app
    assert 'SUPERVISED = "-m ns1.epp"' in app
    assert "import sys, ns1.api; print(1)" in app
    bench = (repo / "bench" / "__init__.py").read_text()
    assert '"soak": "ns1.bench.soak"' in bench and '"kvindex": "ns1.bench.kvindex"' in bench


def test_text_files_and_pyproject_follow(repo: Path) -> None:
    rename(repo, "--apply", "--ns", "ns1")
    docker = (repo / "Dockerfile").read_text()
    assert 'find_spec("ns1.simulator")' in docker
    copies = [line for line in docker.splitlines() if line.startswith("COPY")]
    assert copies == [
        "COPY pyproject.toml ./",
        "COPY infergate ./infergate",
        "COPY kvindex ./kvindex",
        "COPY simulator ./simulator",
        "COPY epp ./epp",
        "COPY controllers ./controllers",
        "COPY bench ./bench",
        "COPY examples ./examples",
    ]
    manifest = (repo / "gateway-manifests" / "epp.yaml").read_text()
    assert "python -m ns1.epp" in manifest and "from ns1.controllers.certs import" in manifest
    assert 'command: ["infergate", "epp"]' in manifest
    project = tomllib.loads((repo / "pyproject.toml").read_text())
    assert project["project"]["name"] == "ns1"
    assert project["project"]["scripts"] == {"infergate": "ns1.cli:main"}
    setuptools = project["tool"]["setuptools"]
    assert setuptools["package-dir"] == {
        "ns1": "infergate",
        "ns1.kvindex": "kvindex",
        "ns1.simulator": "simulator",
        "ns1.epp": "epp",
        "ns1.controllers": "controllers",
        "ns1.bench": "bench",
    }
    assert "ns1.api" in setuptools["packages"] and "ns1.epp.connector" in setuptools["packages"]
    assert setuptools["package-data"] == {"ns1.simulator": ["default_model/*.json"]}


def test_test_moves_carry_their_imports_along(repo: Path) -> None:
    rename(repo, "--apply", "--move-tests")
    moved = repo / "tests" / "epp" / "test_drain.py"
    assert not (repo / "tests" / "test_epp_drain.py").exists()
    assert (repo / "tests" / "epp" / "__init__.py").exists()
    text = moved.read_text()
    assert "from tests.epp.test_director import helper" in text
    assert '"-m", "tests.epp.test_director"' in text


def test_a_second_run_changes_nothing(repo: Path) -> None:
    rename(repo, "--apply")
    after = {rel: (repo / rel).read_text() for rel in SOURCES}
    assert "rewrote 0 files" in rename(repo, "--apply").stdout
    assert {rel: (repo / rel).read_text() for rel in SOURCES} == after


def test_an_import_whose_bound_name_changes_is_reported_not_guessed(repo: Path) -> None:
    (repo / "epp" / "scrape.py").write_text("import epp.metrics\n\nepp.metrics.x = 1\n")
    run = rename(repo, "--apply", check=False)
    assert run.returncode == 1
    assert "PROBLEM epp/scrape.py: `import epp.metrics` binds a name" in run.stdout
    assert (repo / "epp" / "scrape.py").read_text().startswith("import epp.metrics\n")
