"""bench/compiled_probe.py's own logic, without compilers: reading mypy's errors, telling
built modules from Python ones, reusing a build folder, refusing bad arguments."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from infergw.bench import compiled_probe as cp
from tests.paths import ROOT


def test_mypy_errors_are_grouped_by_file_and_notes_are_left_out():
    text = (
        "infergw/epp/a.py:3: error: Incompatible types  [assignment]\n"
        "infergw/epp/a.py:4: note: See https://example\n"
        "infergw/epp/a.py:9: error: Item None has no attribute x  [union-attr]\n"
        "infergw/kvindex/b.py:1: error: Need type annotation  [var-annotated]\n"
        "Found 3 errors in 2 files (checked 40 source files)\n"
    )
    errors = cp._mypy_errors(text)
    assert sorted(errors) == ["infergw/epp/a.py", "infergw/kvindex/b.py"]
    assert len(errors["infergw/epp/a.py"]) == 2


def test_a_module_counts_as_built_only_with_its_extension_beside_it(tmp_path):
    pkg = tmp_path / "infergw" / "epp"
    pkg.mkdir(parents=True)
    for name in ("a.py", "b.py"):
        (pkg / name).write_text("")
    (pkg / "a.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    (tmp_path / "0123__mypyc.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    (tmp_path / "build").mkdir()
    files = ["infergw/epp/a.py", "infergw/epp/b.py"]
    assert cp._built(tmp_path, files) == ["infergw/epp/a.py"]
    cp._remove_built(tmp_path, files)
    assert cp._built(tmp_path, files) == []
    assert not list(tmp_path.glob("*.so")) and not (tmp_path / "build").exists()
    assert (pkg / "a.py").exists()  # the source stays: Python imports it instead


def test_a_folder_built_before_is_reused_without_compiling(tmp_path):
    built = [cp.Build("pure", str(tmp_path / "pure")), cp.Build("cython", "x", 5.0, ["m.py"])]
    (tmp_path / cp.BUILDS).write_text(json.dumps([asdict(b) for b in built]))
    # No compiler exists at this path: reusing must not call one.
    assert cp.build_all("HEAD", tmp_path, "/nonexistent/python", 2, ["cython"]) == built


def test_the_request_path_names_existing_modules_once():
    assert len(set(cp.REQUEST_PATH)) == len(cp.REQUEST_PATH)
    assert set(cp.MYPYC_BREAKS) <= set(cp.REQUEST_PATH)
    assert [m for m in cp.REQUEST_PATH if not (ROOT / m).is_file()] == []


@pytest.mark.parametrize(
    "argv",
    [
        ["--tools-python", "/nonexistent/python"],
        ["--tools-python", "python3", "--rounds", "0"],
        ["--tools-python", "python3", "--compiler", "nuitka"],
    ],
)
def test_bad_arguments_are_refused_before_anything_is_built(argv, capsys):
    with pytest.raises(SystemExit) as done:
        cp.main(argv)
    assert done.value.code == 2
    assert "error:" in capsys.readouterr().err
