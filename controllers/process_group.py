"""Stopping a container as the kubelet and the kernel do: the container is its main process
and everything it started.

Each container runs in its own session, so its process group is the container. In a cluster
SIGTERM goes to the container's main process; when that process exits — stopped, or crashed
on its own — the kernel kills every other process of the container's pid namespace, so no
child (vLLM's EngineCore and workers, holding GPU memory and ports) outlives it. Here the
process group stands in for the pid namespace: once the main process is gone, the group gets
SIGKILL. A main process that ignores SIGTERM gets SIGKILL with its group after the grace period.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path

log = logging.getLogger("controllers.process_group")

POLL_SECONDS = 0.05
KILL_WAIT_SECONDS = 5.0  # SIGKILL is immediate, except for a process stuck in the kernel


def live_members(pgid: int) -> list[int]:
    """The processes of a group that have not exited (zombies have: they hold nothing)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited while we looked
            continue
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses
        state, _ppid, pgrp = stat.rpartition(")")[2].split()[:3]
        if int(pgrp) == pgid and state != "Z":
            pids.append(int(entry.name))
    return pids


async def _gone(pgid: int, within: float) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while live_members(pgid):
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(POLL_SECONDS)
    return True


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


async def stop_container(proc: asyncio.subprocess.Process, grace: float) -> None:
    """SIGTERM to the main process (if it still runs), up to `grace` seconds for it to exit,
    then SIGKILL to whatever is left of its process group, and wait for the group to go."""
    pgid = proc.pid  # start_new_session: the main process leads its own group
    if proc.returncode is None:
        try:
            proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except TimeoutError:
            log.warning("process %d did not exit %.0fs after SIGTERM: killing it", pgid, grace)
    _signal_group(pgid, signal.SIGKILL)
    await proc.wait()
    if not await _gone(pgid, KILL_WAIT_SECONDS):
        log.error("process group %d survives SIGKILL: %s", pgid, live_members(pgid))
