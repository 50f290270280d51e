"""api/logs.py: every command takes --log-format, --log-level and -v/-vv alike (the picker's
-v is the reference's, tests/epp/test_reference_flags.py), the format defaults to json in a
cluster off a terminal and text elsewhere, `infergate up` hands its settings to its children
through the environment, and configure() installs the chosen shape."""

from __future__ import annotations

import io
import json
import logging
import sys

import pytest

from infergw.api import logs
from infergw.bbr.options import parse_options as bbr_options
from infergw.connector.options import parse_options as connector_options
from infergw.controllers.app import build_parser as controllers_parser
from infergw.epp.options import parse_options as picker_options
from infergw.fetch.download import build_parser as download_parser
from infergw.runtime.sidecar import build_parser as runtime_parser
from infergw.simulator.config import parse_config as simulator_config
from infergw.up import build_parser as up_parser

RUNTIME_REQUIRED = [
    "--engine=vllm",
    "--engine-url=http://127.0.0.1:1",
    "--served-model-name=m",
    "--adapters-file=a.yaml",
    "--models-dir=m",
]
CLEAN_ENV = (logs.FORMAT_ENV, logs.LEVEL_ENV, logs.VERBOSITY_ENV, logs.IN_CLUSTER_ENV)


def _connector(argv: list[str]) -> logs.LogSettings:
    o = connector_options(argv)
    return logs.settings(o.log_format, o.log_level, o.verbosity)


# Each command's parse, down to the settings its main() configures.
PARSERS = {
    "picker": lambda argv: picker_options(["--pool-name", "p", *argv]).log,
    "controllers": lambda argv: logs.settings_from_args(controllers_parser().parse_args(argv)),
    "connector": _connector,
    "bbr": lambda argv: bbr_options(["--provider", "file", "--pool-file", "x.yaml", *argv]).log,
    "simulator": lambda argv: simulator_config(argv).log,
    "runtime": lambda argv: logs.settings_from_args(
        runtime_parser().parse_args([*RUNTIME_REQUIRED, *argv])
    ),
    "download": lambda argv: logs.settings_from_args(
        download_parser().parse_args(["hf://o/n", "--dest", "d", *argv])
    ),
    "up": lambda argv: logs.settings_from_args(up_parser().parse_args(argv)),
}


@pytest.fixture(autouse=True)
def _no_log_environment(monkeypatch):
    for name in CLEAN_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("part", sorted(PARSERS))
@pytest.mark.parametrize(
    ("given", "ours", "libraries"),
    [
        ([], "INFO", "INFO"),
        (["--log-level", "Debug"], "DEBUG", "DEBUG"),
        (["--log-level=warn"], "WARN", "WARN"),
        (["-v"], "DEBUG", "INFO"),
        (["-vv"], "DEBUG", "DEBUG"),
        (["-vv", "--log-level=error"], "ERROR", "ERROR"),  # the named level wins
    ],
)
def test_each_command_takes_the_level_flags(part, given, ours, libraries) -> None:
    parsed = PARSERS[part](given)
    assert (parsed.level, parsed.libraries_level) == (ours, libraries)
    assert isinstance(logging.getLevelName(parsed.level), int)


@pytest.mark.parametrize("part", sorted(PARSERS))
def test_each_command_takes_the_format_flag(part) -> None:
    assert PARSERS[part]([]).format == "text"  # not in a cluster
    assert PARSERS[part](["--log-format", "JSON"]).format == "json"


@pytest.mark.parametrize("part", sorted(PARSERS))
@pytest.mark.parametrize(
    ("bad", "said"),
    [
        (["--log-level", "chatty"], "unknown log level 'chatty'"),
        (["--log-format", "xml"], "unknown log format 'xml'"),
    ],
)
def test_an_unknown_value_is_a_usage_error(part, bad, said, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        PARSERS[part](bad)
    assert exit_.value.code == 2
    assert said in capsys.readouterr().err


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("environ", "stream", "expected"),
    [
        ({}, io.StringIO(), "text"),  # a pipe or a file, outside a cluster: text
        ({}, _Tty(), "text"),
        ({logs.IN_CLUSTER_ENV: "10.0.0.1"}, io.StringIO(), "json"),  # a pod's stderr
        ({logs.IN_CLUSTER_ENV: "10.0.0.1"}, _Tty(), "text"),  # kubectl exec -it
        ({logs.IN_CLUSTER_ENV: "10.0.0.1", logs.FORMAT_ENV: "text"}, io.StringIO(), "text"),
        ({logs.FORMAT_ENV: "json"}, _Tty(), "json"),
    ],
)
def test_the_default_format(environ, stream, expected) -> None:
    assert logs.settings(None, None, None, environ, stream).format == expected


def test_a_flag_wins_over_the_environment() -> None:
    env = {logs.FORMAT_ENV: "json", logs.LEVEL_ENV: "error", logs.VERBOSITY_ENV: "2"}
    s = logs.settings("text", None, 1, env, io.StringIO())
    assert (s.format, s.level, s.libraries_level) == ("text", "DEBUG", "INFO")
    s = logs.settings(None, "WARNING", None, env, io.StringIO())
    assert (s.format, s.level, s.libraries_level) == ("json", "WARNING", "WARNING")


@pytest.mark.parametrize(
    ("flags", "child"),
    [
        (["--log-format", "json"], ("json", "INFO", "INFO")),
        (["-v"], ("text", "DEBUG", "INFO")),
        (["-vv", "--log-format=json"], ("json", "DEBUG", "DEBUG")),
        (["--log-level", "warning"], ("text", "WARNING", "WARNING")),
    ],
)
def test_up_hands_its_settings_to_the_processes_it_starts(flags, child) -> None:
    """What `infergate up` puts in its children's environment gives each child its own
    settings back (a child given no log flag)."""
    ours = logs.settings_from_args(up_parser().parse_args(flags))
    env = logs.child_environment(ours)
    got = logs.settings(None, None, None, env, io.StringIO())
    assert (got.format, got.level, got.libraries_level) == child


def test_a_variable_we_cannot_read_is_ignored_and_said(capsys) -> None:
    env = {logs.FORMAT_ENV: "yaml\n", logs.VERBOSITY_ENV: "lots"}
    s = logs.settings(None, None, None, env, io.StringIO())
    assert (s.format, s.level) == ("text", "INFO")
    out = io.StringIO()
    _configured(s, out)
    said = out.getvalue()
    assert f"${logs.FORMAT_ENV}='yaml' is not a value we know; ignored" in said
    assert f"${logs.VERBOSITY_ENV}='lots'" in said


def _configured(s: logs.LogSettings, out: io.StringIO) -> None:
    logs.configure(s, out)


@pytest.fixture(autouse=True)
def _restore_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    ours = {n: logging.getLogger(n).level for n in logs.OUR_LOGGERS}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, lvl in ours.items():
        logging.getLogger(name).setLevel(lvl)


def test_configure_in_text_from_the_level_up() -> None:
    out = io.StringIO()
    logs.configure(logs.LogSettings("text", "WARNING", "WARNING"), out)
    logging.getLogger("somewhere").info("not shown")
    logging.getLogger("somewhere").warning("shown")
    assert "not shown" not in out.getvalue()
    assert out.getvalue().endswith(" WARNING somewhere: shown\n")


def test_one_v_shows_our_debug_lines_and_not_the_libraries() -> None:
    out = io.StringIO()
    logs.configure(logs.settings(None, None, 1, {}, out), out)
    logging.getLogger("infergw.epp.extproc").debug("ours, namespaced")
    logging.getLogger("controllers.model").debug("ours, by folder")
    logging.getLogger("grpc._cython").debug("a library's")
    logging.getLogger("grpc._cython").info("a library's info")
    text = out.getvalue()
    assert "ours, namespaced" in text and "ours, by folder" in text
    assert "a library's info" in text and "a library's\n" not in text


def test_configure_again_replaces_its_handler_and_keeps_others() -> None:
    other = logging.StreamHandler(io.StringIO())
    logging.getLogger().addHandler(other)
    first, second = io.StringIO(), io.StringIO()
    logs.configure(logs.LogSettings("text"), first)
    logs.configure(logs.LogSettings("json"), second)
    logging.getLogger("x").warning("once")
    assert first.getvalue() == ""
    assert json.loads(second.getvalue())["message"] == "once"
    assert other in logging.getLogger().handlers


def test_lines_go_to_stderr_as_it_is_now_not_as_it_was(monkeypatch) -> None:
    """configure() without a stream follows sys.stderr: a process (or a test) that swaps it
    later gets the lines, and the old one, closed, is never written to."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    first, second = io.StringIO(), io.StringIO()
    try:
        monkeypatch.setattr(sys, "stderr", first)
        logs.configure(logs.LogSettings("text", "INFO", "INFO"))
        first.close()
        monkeypatch.setattr(sys, "stderr", second)
        logging.getLogger("infergw.test.stderr").warning("after the swap")
        said = second.getvalue()
        assert "infergw.test.stderr: after the swap" in said and "Logging error" not in said
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
