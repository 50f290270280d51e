"""A real redis-server (Debian's package) for tests, on a free 127.0.0.1 port.

Use the `redis_server` fixture by importing it into a test module:

    from tests.redis_server import redis_server_fixture  # noqa: F401

and ask for `redis_server` in a test's arguments.

`redis-server` is looked up on PATH (and in /usr/sbin, /usr/bin). When it is missing, the
fixture tries `apt-get install -y redis-server` once per test session, if running as root or
under CI=true; if it is still missing the test is skipped with the reason — except under
CI=true, where a missing server fails the test, so CI can never pass by skipping these.
The server runs without persistence (`--save '' --appendonly no`) in the test's tmp dir and is
stopped after the test; `stop()` and `start()` let a test take it down and bring it back on the
same port (the server itself is bench/redis_server.py's, which the soak benchmark uses too).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from infergw.stack.redis_server import SEARCH_PATH, RedisServer
from tests.conftest import free_port

__all__ = ["RedisServer", "find_redis_server", "redis_server_fixture", "require_redis_server"]

_install_attempt: str | None = None  # what the one apt-get attempt of this session said


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


def _apt_get_install() -> str:
    """Install Debian's redis-server once; returns a note on what happened."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "redis-server"]
    try:
        done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:  # a fresh machine may need the package lists first
            subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=600)
            done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"apt-get install redis-server failed: {e}"
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return f"apt-get install redis-server exited {done.returncode}: {' | '.join(tail)}"
    return "apt-get install redis-server succeeded"


def find_redis_server() -> str | None:
    """The redis-server binary, installing it with apt-get once when allowed."""
    global _install_attempt
    path = shutil.which("redis-server", path=SEARCH_PATH)
    if path is not None:
        return path
    if _install_attempt is None and (os.geteuid() == 0 or in_ci()):
        _install_attempt = _apt_get_install()
    return shutil.which("redis-server", path=SEARCH_PATH)


def require_redis_server() -> str:
    """The binary, or skip (fail under CI=true) saying why there is none."""
    path = find_redis_server()
    if path is not None:
        return path
    reason = "redis-server is not installed (Debian: apt-get install redis-server)"
    if _install_attempt is not None:
        reason += f"; {_install_attempt}"
    if in_ci():
        pytest.fail(f"{reason} — CI=true, so this must not be skipped", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(name="redis_server")
def redis_server_fixture(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh, empty redis-server for this test; stopped afterwards."""
    server = RedisServer(require_redis_server(), free_port(), tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()
