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
same port.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port

__all__ = ["RedisServer", "find_redis_server", "redis_server_fixture", "require_redis_server"]

_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/bin"])
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
    path = shutil.which("redis-server", path=_SEARCH_PATH)
    if path is not None:
        return path
    if _install_attempt is None and (os.geteuid() == 0 or in_ci()):
        _install_attempt = _apt_get_install()
    return shutil.which("redis-server", path=_SEARCH_PATH)


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


def ping(port: int, timeout: float = 0.5) -> bool:
    """True when a Redis on 127.0.0.1:port answers PING."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server process on 127.0.0.1:`port`, started and stopped by the test."""

    def __init__(self, binary: str, port: int, workdir: Path) -> None:
        self.binary = binary
        self.port = port
        self.workdir = workdir
        self.log = workdir / "redis.log"
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 15.0) -> None:
        assert not self.running, "already running"
        cmd = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
            "--daemonize",
            "no",
            "--logfile",
            "",
        ]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while not ping(self.port):
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited with {self.proc.returncode}: "
                    f"{self.log.read_text(errors='replace')[-2000:]}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server on port {self.port} gave no PONG in {timeout}s")
            time.sleep(0.05)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(name="redis_server")
def redis_server_fixture(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh, empty redis-server for this test; stopped afterwards."""
    server = RedisServer(require_redis_server(), free_port(), tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()
