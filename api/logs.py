"""One log format and one set of log flags for every process of ours (picker, controllers,
body-based router, P/D sidecar, simulator, runtime sidecar, `infergate up`), so an operator
reads, greps and collects their logs the same way. Here, on the floor they all stand on,
because it is a shared convention like the names in names.py; stdlib only.

    --log-format text|json   default: $INFERGATE_LOG_FORMAT, else json in a cluster (not on a
                             terminal), else text
    --log-level LEVEL        every logger from LEVEL up (wins over -v)
    -v                       our loggers at debug, libraries at info
    -vv                      every logger at debug (grpc, aiohttp, the Kubernetes client too)

`infergate up` sets INFERGATE_LOG_FORMAT, INFERGATE_LOG_LEVEL and INFERGATE_VERBOSITY for the
processes it starts, so its flags reach every one of them; a flag given to a process wins. A
variable that holds nothing we know is ignored, and said in the first log line.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TextIO, TypeVar

from infergw.api.log_format import JsonFormatter, TextFormatter

FORMATS = ("text", "json")
FORMAT_ENV = "INFERGATE_LOG_FORMAT"
LEVEL_ENV = "INFERGATE_LOG_LEVEL"
VERBOSITY_ENV = "INFERGATE_VERBOSITY"
# Set by the kubelet in every container (the API server's address): we run in a cluster.
IN_CLUSTER_ENV = "KUBERNETES_SERVICE_HOST"
# The top-level names of our loggers: -v turns these to debug and leaves libraries alone.
OUR_LOGGERS = (
    "infergw",
    "api",
    "bbr",
    "cluster",
    "connector",
    "controllers",
    "epp",
    "fetch",
    "kvindex",
    "runtime",
    "simulator",
    "stack",
    "up",
)
DEFAULT_LEVEL = "INFO"
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class LogSettings:
    """How a process logs: the line format, our loggers' level, everyone else's level."""

    format: str = "text"
    level: str = DEFAULT_LEVEL  # our loggers
    libraries_level: str = DEFAULT_LEVEL  # the root logger: libraries, and ours unless -v
    problems: tuple[str, ...] = ()  # environment variables ignored, said once logging is set


def level_name(text: str) -> str:
    """argparse `type` of --log-level: a level `logging` knows, in any case, as its upper-case
    name. Anything else is a usage error (exit 2) rather than a traceback at start."""
    name = text.upper()
    if name not in logging.getLevelNamesMapping():
        known = ", ".join(sorted(n.lower() for n in logging.getLevelNamesMapping()))
        raise argparse.ArgumentTypeError(f"unknown log level {text!r} (one of: {known})")
    return name


def format_name(text: str) -> str:
    name = text.strip().lower()
    if name not in FORMATS:
        raise argparse.ArgumentTypeError(f"unknown log format {text!r} (one of: text, json)")
    return name


def default_format(environ: Mapping[str, str], stream: TextIO) -> str:
    """Json in a cluster unless a person is watching (`kubectl exec -it` gives a terminal),
    else text. Not "any stderr that is not a terminal": `infergate up` writes its children's
    logs to files people read, and CI logs are read by people too."""
    in_cluster = bool(environ.get(IN_CLUSTER_ENV))
    return "json" if in_cluster and not _isatty(stream) else "text"


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or not a real stream
        return False


def add_log_flags(p: argparse._ActionsContainer, *, verbose_flag: bool = True) -> None:
    """--log-format, --log-level and (unless the parser has its own -v: the picker takes the
    reference's `-v N`, epp/reference_flags.py) -v/-vv, into a parser or (for `--help`'s
    headings) its "Logging" group."""
    p.add_argument(
        "--log-format",
        type=format_name,
        default=None,
        help=f"text or json (default: ${FORMAT_ENV}, else json in a cluster off a terminal, "
        "else text)",
    )
    p.add_argument(
        "--log-level",
        type=level_name,
        default=None,
        help="every logger from this level up: debug, info, warning, error (default info)",
    )
    if verbose_flag:
        p.add_argument(
            "-v",
            "--verbose",
            dest="verbosity",
            action="count",
            default=None,
            help="-v: our log lines at debug; -vv: every library's too",
        )


def _from_env(
    environ: Mapping[str, str], name: str, read: Callable[[str], T], problems: list[str]
) -> T | None:
    text = environ.get(name, "").strip()
    if not text:
        return None
    try:
        return read(text)
    except (argparse.ArgumentTypeError, ValueError):
        problems.append(f"${name}={text[:64]!r} is not a value we know; ignored")
        return None


def _verbosity(text: str) -> int:
    if not text.isdigit():
        raise ValueError(text)
    return min(int(text), 2)


def settings(
    log_format: str | None,
    log_level: str | None,
    verbosity: int | None,
    environ: Mapping[str, str] | None = None,
    stream: TextIO | None = None,
) -> LogSettings:
    """The settings the flags ask for, the environment filling what they leave out."""
    environ = os.environ if environ is None else environ
    problems: list[str] = []
    env_format = _from_env(environ, FORMAT_ENV, format_name, problems)
    env_level = _from_env(environ, LEVEL_ENV, level_name, problems)
    env_count = _from_env(environ, VERBOSITY_ENV, _verbosity, problems)
    fmt = log_format or env_format or default_format(environ, stream or sys.stderr)
    level = log_level or (env_level if verbosity is None else None)
    count = verbosity if verbosity is not None else env_count or 0
    if level is not None:
        return LogSettings(fmt, level, level, tuple(problems))
    if count >= 2:
        return LogSettings(fmt, "DEBUG", "DEBUG", tuple(problems))
    if count == 1:
        return LogSettings(fmt, "DEBUG", DEFAULT_LEVEL, tuple(problems))
    return LogSettings(fmt, problems=tuple(problems))


def settings_from_args(a: argparse.Namespace) -> LogSettings:
    """From a namespace add_log_flags filled."""
    return settings(a.log_format, a.log_level, getattr(a, "verbosity", None))


def child_environment(s: LogSettings) -> dict[str, str]:
    """The variables that give a child process these settings (`infergate up`'s children)."""
    if s.level != s.libraries_level:  # -v
        return {FORMAT_ENV: s.format, VERBOSITY_ENV: "1"}
    return {FORMAT_ENV: s.format, LEVEL_ENV: s.level}


class _Handler(logging.StreamHandler):
    """The handler configure() installs (and replaces when called again)."""


class _StderrHandler(_Handler):
    """Writes to sys.stderr as it is at each line, not as it was at configure(): whoever
    swaps it later (pytest's capture between tests, a redirect) gets the lines, and a closed
    old one is never written to."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:  # StreamHandler.__init__ sets it; sys.stderr wins
        pass


def configure(s: LogSettings, stream: TextIO | None = None) -> None:
    """Log to stderr (or `stream`) as `s` says; again from scratch if called again."""
    handler = _StderrHandler() if stream is None else _Handler(stream)
    handler.setFormatter(JsonFormatter() if s.format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in root.handlers[:]:
        if isinstance(old, _Handler):  # ours from before; others' (pytest's) stay
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(s.libraries_level)
    ours = s.level if s.level != s.libraries_level else logging.NOTSET
    for name in OUR_LOGGERS:
        logging.getLogger(name).setLevel(ours)
    for problem in s.problems:
        logging.getLogger("infergw.logs").warning("%s", problem)
