"""api/lifetime.py: a child started through spawn() exits when its parent is SIGKILLed,
from the main thread or any other; one started by plain Popen outlives it (what the helper
is for)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from infergw.bench.common import process_gone

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")

SLEEPER = "[sys.executable, '-c', 'import time; time.sleep(600)']"

# The parent: starts a sleeping child one way, prints its pid, then sleeps until killed.
PARENTS = {
    "main thread": f"import sys, time\n"
    f"from infergw.api.lifetime import spawn\n"
    f"child = spawn({SLEEPER})\n",
    # a worker thread that has ended by the time the parent dies: the child must not have
    # died with it, and must die with the process
    "ended thread": f"import sys, threading, time\n"
    f"from infergw.api.lifetime import spawn\n"
    f"out = []\n"
    f"t = threading.Thread(target=lambda: out.append(spawn({SLEEPER})))\n"
    f"t.start(); t.join()\n"
    f"child = out[0]\n",
    "plain Popen": f"import subprocess, sys, time\nchild = subprocess.Popen({SLEEPER})\n",
}
TAIL = "print(child.pid, flush=True)\ntime.sleep(600)\n"


@contextmanager
def parent(how: str) -> Iterator[tuple[subprocess.Popen, int]]:
    """The parent process and its child's pid; both killed afterwards if still there."""
    proc = subprocess.Popen(
        [sys.executable, "-c", PARENTS[how] + TAIL], stdout=subprocess.PIPE, text=True
    )
    child = None
    try:
        line = proc.stdout.readline()
        assert line.strip().isdigit(), f"the parent printed {line!r}"
        child = int(line)
        yield proc, child
    finally:
        for pid in (proc.pid, child):
            if pid is not None and not process_gone(pid):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()


def gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process_gone(pid):
            return True
        time.sleep(0.02)
    return process_gone(pid)


@pytest.mark.parametrize("how", ["main thread", "ended thread"])
def test_a_spawned_child_exits_when_its_parent_is_killed(how):
    with parent(how) as (proc, child):
        time.sleep(0.3)
        assert not process_gone(child), "the child died while its parent lived"
        proc.kill()
        proc.wait()
        assert gone_within(child, 5), f"child {child} still runs 5 s after its parent died"


def test_a_plain_popen_child_outlives_its_killed_parent():
    """The control: without spawn() the child stays, so the test above can tell."""
    with parent("plain Popen") as (proc, child):
        proc.kill()
        proc.wait()
        assert not gone_within(child, 1)


def test_spawn_refuses_a_preexec_fn_of_its_own():
    from infergw.api.lifetime import spawn

    with pytest.raises(TypeError, match="preexec_fn"):
        spawn([sys.executable, "-c", "pass"], preexec_fn=lambda: None)
