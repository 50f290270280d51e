"""api/version.py and setup.py: `infergate --version`, each command's --version and the
picker's inference_extension_info name the version and the commit: the built wheel's, else
this checkout's HEAD, else "unknown"."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from infergw.api import version
from infergw.epp.metrics import PickerMetrics
from tests.paths import ROOT


def head(root: Path = ROOT) -> str:
    return subprocess.run(
        ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()


def test_the_commit_is_this_checkouts_head() -> None:
    assert version.commit() == head()
    assert version.short_commit() == head()[:12]


def test_infergate_version_prints_version_and_commit() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "infergw.cli", "--version"],
        capture_output=True,
        text=True,
        check=True,
        cwd="/",
    ).stdout
    assert out.strip() == f"infergate {version.version()} (commit {head()[:12]})"
    assert version.version() not in ("", version.UNKNOWN)


@pytest.mark.parametrize(
    "command", ["epp", "bbr", "controllers", "connector", "simulate", "runtime", "download", "up"]
)
def test_each_command_says_its_version(command, capsys) -> None:
    from infergw.cli import main

    with pytest.raises(SystemExit) as exit_:
        main([command, "--version"])
    assert exit_.value.code == 0
    assert f"(commit {head()[:12]})" in capsys.readouterr().out


def test_the_picker_metric_names_the_commit_and_version() -> None:
    text = generate_latest(PickerMetrics().registry).decode()
    (line,) = [ln for ln in text.splitlines() if ln.startswith("inference_extension_info{")]
    assert f'commit="{head()}"' in line
    assert f'version="{version.version()}"' in line
    assert line.endswith(" 1.0")


def test_outside_a_checkout_there_is_no_commit(tmp_path) -> None:
    assert version.checkout_commit(tmp_path) is None
    (tmp_path / "sub").mkdir()  # inside another repository is not ours either
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    assert version.checkout_commit(tmp_path / "sub") is None


def test_a_checkout_gives_its_own_head(tmp_path) -> None:
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "x"], check=True)
    assert version.checkout_commit(tmp_path) == head(tmp_path)


def _setup_module():
    spec = importlib.util.spec_from_file_location("infergate_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not as __main__: setup() does not run
    return module


def test_the_build_hook_takes_the_commit_from_the_image_build_argument(monkeypatch) -> None:
    setup = _setup_module()
    monkeypatch.setenv(setup.COMMIT_ENV, "AB" * 20)
    assert setup.build_commit() == "ab" * 20
    monkeypatch.setenv(setup.COMMIT_ENV, "main; rm -rf /")
    with pytest.raises(SystemExit, match="not a full git commit hash"):
        setup.build_commit()
    monkeypatch.delenv(setup.COMMIT_ENV)
    assert setup.build_commit() == head()


def test_the_build_hook_writes_the_commit_the_wheel_reads(tmp_path, monkeypatch) -> None:
    """build_py's hook writes _build_info.py into the build; api/version.py prefers it."""
    setup = _setup_module()
    from setuptools import Distribution

    monkeypatch.setenv(setup.COMMIT_ENV, "cd" * 20)
    cmd = setup.BuildPyWithCommit(Distribution({"packages": []}))
    cmd.initialize_options()
    cmd.build_lib = str(tmp_path)
    cmd.finalize_options()
    cmd.run()
    written = tmp_path / setup.BUILD_INFO
    namespace: dict = {}
    exec(written.read_text(), namespace)
    assert namespace["COMMIT"] == "cd" * 20
    monkeypatch.delenv(setup.COMMIT_ENV)
    monkeypatch.setattr(setup, "HERE", tmp_path)  # no checkout, no variable: no file
    cmd.run()
    assert not written.exists()


def test_a_built_commit_wins_over_the_checkout(monkeypatch) -> None:
    built = type(sys)("infergw.api._build_info")
    built.COMMIT = "ef" * 20
    monkeypatch.setitem(sys.modules, version.BUILD_INFO_MODULE, built)
    version.commit.cache_clear()
    try:
        assert version.commit() == "ef" * 20
    finally:
        version.commit.cache_clear()
