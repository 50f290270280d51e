"""A component that dies before it is ready is reported with the end of its log, so a failed
start says why (a port taken, a bad flag) instead of only an exit status."""

from __future__ import annotations

import subprocess
import sys

import pytest

from infergw.stack.readiness import LOG_TAIL_BYTES, wait_http, wait_until


def _dying_process(log_path, lines: list[str]) -> subprocess.Popen:
    script = "import sys\n" + "".join(f"print({line!r})\n" for line in lines) + "sys.exit(3)\n"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=out, stderr=out)
    proc.wait(timeout=30)
    return proc


def test_a_process_dead_before_ready_is_reported_with_its_logs_end(tmp_path):
    log = tmp_path / "pod.log"
    proc = _dying_process(log, ["starting", "OSError: [Errno 98] address already in use"])
    with pytest.raises(RuntimeError) as err:
        wait_http("http://127.0.0.1:9/health", 5, proc, log)
    assert "exited with 3" in str(err.value)
    assert "address already in use" in str(err.value) and str(log) in str(err.value)
    with pytest.raises(RuntimeError) as err:
        wait_until(lambda: False, 5, proc, "the pool", log)
    assert "while waiting for the pool" in str(err.value) and "Errno 98" in str(err.value)


def test_only_the_end_of_a_long_log_is_quoted(tmp_path):
    log = tmp_path / "pod.log"
    proc = _dying_process(log, ["x" * 100] * 200 + ["the last line"])
    with pytest.raises(RuntimeError) as err:
        wait_http("http://127.0.0.1:9/health", 5, proc, log)
    assert "the last line" in str(err.value)
    assert len(str(err.value)) < LOG_TAIL_BYTES + 300


def test_a_missing_log_is_said_not_raised(tmp_path):
    proc = _dying_process(tmp_path / "other.log", [])
    with pytest.raises(RuntimeError, match="could not be read"):
        wait_http("http://127.0.0.1:9/health", 5, proc, tmp_path / "absent.log")
