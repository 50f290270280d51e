"""stack/envoy_logs.py: the real Envoy, given the flags the stack gives it, writes JSON lines
with our fields (each parses, even around a hostile name in its config) or its own text with
controls escaped; and its level follows ours."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from infergw.api.logs import LogSettings
from infergw.stack.envoy_logs import UTC_ENV, envoy_level, envoy_log_args
from infergw.stack.local import envoy_binary

# A runtime value Envoy logs at start: a quote, a backslash, a newline that would forge a line.
HOSTILE = 'v"q\\x\n{"level":"forged"}'
CONFIG = {"layered_runtime": {"layers": [{"name": "hostile", "static_layer": {"k": HOSTILE}}]}}


def validate(tmp_path: Path, s: LogSettings) -> str:
    """Envoy's log (stderr) of checking CONFIG (`--mode validate`: no ports, done in a
    second; its verdict goes to stdout)."""
    path = tmp_path / "envoy.json"
    path.write_text(json.dumps(CONFIG))
    done = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path), *envoy_log_args(s)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **UTC_ENV},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stderr


def test_envoy_writes_our_json_lines(tmp_path) -> None:
    out = validate(tmp_path, LogSettings("json", "DEBUG", "DEBUG"))
    lines = [json.loads(line) for line in out.splitlines()]  # each line parses
    assert len(lines) > 5
    for line in lines:
        assert set(line) == {"time", "level", "logger", "message"}, line
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"])
        assert line["level"] in {"trace", "debug", "info", "warning", "error", "critical"}
        assert line["logger"].startswith("envoy.")
    assert any(line["level"] == "debug" for line in lines)  # -vv reached Envoy
    # The hostile value came through whole, inside one line's message.
    assert any('{\\"level\\":\\"forged\\"}' in line["message"] for line in lines), lines


def test_envoy_text_keeps_a_hostile_value_on_its_line(tmp_path) -> None:
    out = validate(tmp_path, LogSettings("text", "DEBUG", "DEBUG"))
    assert out.splitlines() and all(line.startswith("[") for line in out.splitlines()), out
    assert "\\n{" in out  # the newline, escaped


@pytest.mark.parametrize(
    ("settings", "level"),
    [
        (LogSettings(), "warn"),  # the default: Envoy's info is start-up chatter
        (LogSettings("text", "DEBUG", "INFO"), "info"),  # -v
        (LogSettings("text", "DEBUG", "DEBUG"), "debug"),  # -vv, --log-level debug
        (LogSettings("text", "WARNING", "WARNING"), "warn"),
        (LogSettings("text", "ERROR", "ERROR"), "error"),
        (LogSettings("text", "CRITICAL", "CRITICAL"), "critical"),
        (LogSettings("text", "NOTSET", "NOTSET"), "debug"),
    ],
)
def test_envoy_level_follows_ours(settings, level) -> None:
    assert envoy_level(settings) == level
