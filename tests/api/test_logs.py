"""api/logs.py: --log-level of the picker, the controllers and the connector takes any level
`logging` knows, in any case, and refuses anything else as a usage error naming the value."""

from __future__ import annotations

import logging

import pytest

from infergw.api import logs
from infergw.connector.options import parse_options as connector_options
from infergw.controllers.app import build_parser as controllers_parser
from infergw.epp.options import parse_options as picker_options

PARSERS = {
    "picker": lambda argv: picker_options(["--pool-name", "p", *argv]).log_level,
    "controllers": lambda argv: controllers_parser().parse_args(argv).log_level,
    "connector": lambda argv: connector_options(argv).log_level,
}


@pytest.mark.parametrize("part", sorted(PARSERS))
@pytest.mark.parametrize(
    ("given", "level"),
    [([], "INFO"), (["--log-level", "Debug"], "DEBUG"), (["--log-level=warn"], "WARN")],
)
def test_a_known_level_in_any_case_is_taken(part: str, given: list[str], level: str) -> None:
    parsed = PARSERS[part](given)
    assert parsed == level
    assert isinstance(logging.getLevelName(parsed), int)


@pytest.mark.parametrize("part", sorted(PARSERS))
def test_an_unknown_level_is_a_usage_error(part: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        PARSERS[part](["--log-level", "chatty"])
    assert exit_.value.code == 2
    assert "unknown log level 'chatty'" in capsys.readouterr().err


def test_configure_logs_to_stderr_in_the_shared_format(monkeypatch, capsys) -> None:
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(root, "level", root.level)
    logs.configure("warning")
    logging.getLogger("somewhere").info("not shown")
    logging.getLogger("somewhere").warning("shown")
    err = capsys.readouterr().err
    assert "not shown" not in err
    assert err.endswith(" WARNING somewhere: shown\n")
