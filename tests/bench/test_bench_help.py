"""Every benchmark `infergate bench NAME` names answers --help: its flags parse (a flag defined
twice once broke `infergate bench routing` for a day without a test noticing)."""

from __future__ import annotations

import importlib

import pytest

from infergw.cli import BENCHMARKS


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_each_benchmark_answers_help(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    module = importlib.import_module(BENCHMARKS[name])
    with pytest.raises(SystemExit) as done:
        module.main(["--help"])
    assert done.value.code == 0
    assert "usage:" in capsys.readouterr().out
