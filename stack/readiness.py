"""Wait for a server we started to answer (or any condition to hold), failing fast if its
process dies first."""

from __future__ import annotations

import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

# How much of a dead process's log an error quotes: enough for a traceback's last frames.
LOG_TAIL_BYTES = 2000


def _exited(proc: subprocess.Popen, what: str, log: Path | None) -> RuntimeError:
    """The error for a process that died before `what`, quoting the end of its log."""
    message = f"process exited with {proc.returncode} {what}"
    if log is not None:
        try:
            with open(log, "rb") as f:
                f.seek(max(0, f.seek(0, 2) - LOG_TAIL_BYTES))
                tail = f.read().decode("utf-8", "replace").strip()
        except OSError as exc:
            tail = f"(its log {log} could not be read: {exc})"
        message += f"; the end of {log}:\n{tail}"
    return RuntimeError(message)


def wait_http(
    url: str, timeout: float = 30.0, proc: subprocess.Popen | None = None, log: Path | None = None
) -> None:
    """Poll `url` until it answers 200; raise if `proc` exits (quoting `log`'s end) or
    `timeout` passes."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise _exited(proc, f"before {url} was ready", log)
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError) as exc:
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"{url} not ready after {timeout:.0f}s: {last}")


def wait_until(
    check: Callable[[], bool],
    timeout: float,
    proc: subprocess.Popen | None,
    what: str,
    log: Path | None = None,
) -> None:
    """Poll `check` until it holds; raise if `proc` exits (quoting `log`'s end) or `timeout`
    passes."""
    deadline = time.monotonic() + timeout
    while not check():
        if proc is not None and proc.poll() is not None:
            raise _exited(proc, f"while waiting for {what}", log)
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)
