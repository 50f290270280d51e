"""Child processes that exit with their parent: the one way the stack, the tests and the
benchmarks start a process (Envoy, pickers, controllers, simulators, redis).

A process that is killed by a signal (pytest under a CI timeout, `infergate up` SIGKILLed)
runs no cleanup, and everything it started used to keep running: ports held, CPU spent, the
next run confused. On Linux each child asks the kernel for SIGTERM when its parent dies
(prctl PR_SET_PDEATHSIG, kept across exec), so it stops as if its parent had stopped it and
can still stop what it started itself (the controllers stop their pods). Elsewhere children
start as before.

The kernel's "parent" is the thread that forked, not the process: a child forked from a
worker thread would be signalled when that thread ends (asyncio.to_thread's pool threads end
with their loop). So children are forked from the main thread, or else from one spawner
thread that lives as long as the process.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import Future
from queue import SimpleQueue
from typing import Any

__all__ = ["DEATH_SIGNAL", "die_with_parent", "spawn"]

DEATH_SIGNAL = signal.SIGTERM  # what a child gets when its parent dies
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _libc_prctl():
    """libc's prctl, looked up now: the forked child must not load anything before exec."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl


_prctl = _libc_prctl()


def die_with_parent():
    """A preexec_fn (None where the kernel offers nothing) for a child of this process: the
    child gets DEATH_SIGNAL when the forking thread ends, and exits at once if its parent is
    already gone (it died between fork and prctl). For asyncio's subprocesses, whose loop
    runs on the main thread; anything else starts through spawn()."""
    if _prctl is None:
        return None
    prctl, signum, parent = _prctl, int(DEATH_SIGNAL), os.getpid()

    def preexec() -> None:  # runs in the forked child, before exec: no imports, no locks
        if prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
            os._exit(126)
        if os.getppid() != parent:
            os._exit(126)

    return preexec


def _popen(args: Any, kwargs: dict[str, Any]) -> subprocess.Popen:
    if "preexec_fn" in kwargs:
        raise TypeError("spawn sets preexec_fn itself")
    return subprocess.Popen(args, preexec_fn=die_with_parent(), **kwargs)


class _Spawner:
    """One daemon thread that forks for every thread but the main one."""

    def __init__(self) -> None:
        self._jobs: SimpleQueue[tuple[Future, Any, dict[str, Any]]] = SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def popen(self, args: Any, kwargs: dict[str, Any]) -> subprocess.Popen:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="spawner", daemon=True)
                self._thread.start()
        done: Future[subprocess.Popen] = Future()
        self._jobs.put((done, args, kwargs))
        return done.result()

    def _run(self) -> None:
        while True:
            done, args, kwargs = self._jobs.get()
            try:
                done.set_result(_popen(args, kwargs))
            except BaseException as exc:  # handed to the caller, raised there
                done.set_exception(exc)


_spawner = _Spawner()


def spawn(args: Any, **kwargs: Any) -> subprocess.Popen:
    """subprocess.Popen(args, **kwargs) for a child that exits when this process dies."""
    if _prctl is None:
        return subprocess.Popen(args, **kwargs)
    if threading.current_thread() is threading.main_thread():
        return _popen(args, kwargs)
    return _spawner.popen(args, kwargs)


def stop(proc: subprocess.Popen | None, grace: float = 10) -> None:
    """SIGTERM a process `spawn` started, SIGKILL it if it has not exited after `grace`
    seconds (a server the stack owns: redis-server, the local S3)."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
