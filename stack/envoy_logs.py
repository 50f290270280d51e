"""Envoy's command-line log flags from the stack's log settings (api/logs.py), so
`infergate up --log-format json -v` gets Envoy's lines in the same shape and at the matching
level as every other process in the work directory.

Envoy is not ours: its level follows the libraries' column of README "Logs and version",
one step quieter at the default (Envoy's info is start-up and configuration chatter).
"""

from __future__ import annotations

import logging

from infergw.api.logs import LogSettings

# The fields of our JSON lines (api/log_format.py) in Envoy's --log-format (spdlog) flags: %j
# is the message escaped as a JSON string, %l the level's name (debug, info, warning, ...).
# The time is local: the stack starts Envoy with TZ=UTC so it reads as ours does.
JSON_FORMAT = '{"time":"%Y-%m-%dT%T.%eZ","level":"%l","logger":"envoy.%n","message":"%j"}'
UTC_ENV = {"TZ": "UTC"}


def envoy_level(s: LogSettings) -> str:
    """Envoy's --log-level for these settings."""
    if s.libraries_level == "DEBUG" or s.level == "NOTSET":  # -vv, --log-level debug
        return "debug"
    if s.level == "DEBUG":  # -v: ours at debug, libraries at info
        return "info"
    number = logging.getLevelNamesMapping()[s.level]
    if number >= logging.CRITICAL:
        return "critical"
    if number >= logging.ERROR:
        return "error"
    return "warn"  # info (the default) and warning


def envoy_log_args(s: LogSettings) -> list[str]:
    """--log-level, and the line format: JSON as ours, or Envoy's own text with each message's
    control characters escaped (as our text lines escape them: no value starts a line)."""
    shape = ["--log-format", JSON_FORMAT] if s.format == "json" else ["--log-format-escaped"]
    return ["--log-level", envoy_level(s), *shape]
