"""`infergate up` keeps its stack running as the kubelet keeps containers running: a killed
component is restarted, and the stack stops only on Ctrl-C or SIGTERM."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests

from infergw.api import logs
from infergw.api.lifetime import spawn
from infergw.stack.local import stop_group
from infergw.stack.readiness import wait_http, wait_until
from infergw.stack.supervise import BackOff, Supervisor
from tests.default_ports import DEFAULT_PORTS, ports_free

URL = "http://127.0.0.1:8080/v1/chat/completions"
CHAT = {"model": "infergate-sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def _pids_with(*words: str) -> list[int]:
    """Processes whose command line holds every word (a picker of one workdir, say)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        text = b" ".join(args).decode(errors="replace")
        if all(w in text for w in words):
            found.append(int(cmdline.parent.name))
    return found


def test_backoff_follows_the_kubelet():
    """At once, then 10 s doubling to the 5 min cap."""
    b = BackOff()
    delays = [b.delay(n) for n in range(1, 10)]
    assert delays[:4] == [0.0, b.initial, 2 * b.initial, 4 * b.initial]
    assert max(delays) == b.cap and delays == sorted(delays)


def _delays_logged(backoff: BackOff, exits: int) -> list[str]:
    """Supervise a process that exits at once until it has exited `exits` times; the
    restart delays the supervisor logged."""
    lines: list[str] = []
    supervisor = Supervisor(backoff, log=lines.append)

    def start(env):
        return spawn([sys.executable, "-c", "exit(3)"], env=env)

    supervisor.run("crasher", start)
    try:
        while sum("exited with status 3" in line for line in lines) < exits:
            supervisor.tick()
            time.sleep(0.05)
    finally:
        supervisor.release("crasher").wait()
    return [line.split("restarting in ")[1].split(" s ")[0] for line in lines if "exited" in line]


def test_a_crash_loop_backs_off_and_a_long_run_starts_over():
    assert _delays_logged(BackOff(initial=0.1, cap=0.2), 4) == ["0", "0.1", "0.2", "0.2"]
    # every run counts as long: each exit is the first in a row again
    assert _delays_logged(BackOff(initial=0.1, cap=0.2, reset_after=0), 3) == ["0", "0", "0"]


def test_exits_and_restarts_are_the_launchers_log_lines(tmp_path):
    """By default the supervisor says what it does through logging, so `infergate up
    --log-format json` writes those lines as JSON too."""
    out = tmp_path / "up.log"
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    with out.open("w") as stream:
        logs.configure(logs.LogSettings("json"), stream)
        supervisor = Supervisor(BackOff(initial=0.1, cap=0.1))
        supervisor.run("crasher", lambda env: spawn([sys.executable, "-c", "exit(3)"], env=env))
        try:
            restarted = "restarted crasher"
            wait_until(
                lambda: supervisor.tick() or restarted in out.read_text(), 30, None, restarted
            )
        finally:
            supervisor.release("crasher").wait()
            root.handlers[:] = handlers
            root.setLevel(level)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    said = {(ln["level"], ln["logger"]) for ln in lines if ln["message"].startswith("supervisor:")}
    assert said == {("warning", "infergw.stack.supervise")}, lines


def test_a_killed_component_restarts_and_what_it_left_is_killed(tmp_path):
    """A component that started a process of its own (as the controllers start pods) is
    restarted after SIGKILL, and the orphan it left is killed first, as a cgroup would be."""
    lines: list[str] = []
    supervisor = Supervisor(log=lines.append)
    child_pid = tmp_path / "child.pid"
    script = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'],"
        " start_new_session=True)\n"
        f"open({str(child_pid)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(600)\n"
    )

    def start(env):
        return spawn([sys.executable, "-c", script], env=env, start_new_session=True)

    first = supervisor.run("parent", start)
    try:
        wait_until(lambda: child_pid.exists() and child_pid.read_text(), 30, first, "the child")
        orphan = int(child_pid.read_text())
        child_pid.unlink()
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        supervisor.tick()
        second = supervisor.procs["parent"]
        assert second.pid != first.pid and second.poll() is None
        assert supervisor.restarts("parent") == 1
        wait_until(lambda: not _alive(orphan), 30, None, f"the orphan {orphan} to be killed")
        assert any("parent exited with status -9" in line for line in lines), lines
        assert any("killed 1 processes it left" in line for line in lines), lines
    finally:
        proc = supervisor.release("parent")
        if proc is not None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        supervisor.kill_leftovers("parent")


def _envoy_marks_picker_down() -> bool:
    """Envoy has taken the picker out: a failed health check or an ejection."""
    clusters = requests.get("http://127.0.0.1:9901/clusters", timeout=10).text
    flags = "endpoint-picker::127.0.0.1:9002::health_flags::"
    line = next((ln for ln in clusters.splitlines() if ln.startswith(flags)), flags)
    return "failed_active_hc" in line or "failed_outlier_check" in line


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent to reap it counts as dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@contextmanager
def _up(tmp_path: Path, *flags: str) -> Iterator[tuple[subprocess.Popen, Path, Path]]:
    """`infergate up --no-auth FLAGS` on the default ports: (process, its log, workdir),
    once it has printed its banner; SIGTERM stops it (and so its stack) afterwards."""
    if not ports_free(DEFAULT_PORTS):
        pytest.skip("the default local-stack ports are in use on this machine")
    log, workdir = tmp_path / "up.log", tmp_path / "w"
    with open(log, "wb") as out:
        up = spawn(
            [
                sys.executable,
                "-m",
                "infergw.cli",
                "up",
                "--no-auth",
                "--workdir",
                str(workdir),
                *flags,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_until(lambda: b"Ctrl-C stops everything" in log.read_bytes(), 120, up, "the stack")
        yield up, log, workdir
    finally:
        stop_group(up, grace=60)


@pytest.mark.slow
def test_up_restarts_a_killed_picker_and_fails_open_meanwhile(tmp_path):
    with _up(tmp_path, "--pods", "2", "--failure-mode", "FailOpen") as (up, log, workdir):
        first = requests.post(URL, json=CHAT, timeout=60)
        assert first.status_code == 200 and "x-gateway-destination-endpoint-served" in first.headers
        [picker] = _pids_with("-m infergw.epp", str(workdir / "pool.yaml"))
        os.kill(picker, signal.SIGKILL)

        # Once Envoy has taken the picker out (the first refused connection ejects it),
        # every request is answered: by the pods directly while the picker is down
        # (FailOpen), then through the restarted picker. The request that finds the
        # connection refused has already streamed its body to the dead picker and cannot
        # fail open (a 500).
        routed_again = False
        answered = 0
        while not routed_again:
            assert up.poll() is None, log.read_text()
            picker_marked_down = _envoy_marks_picker_down()
            r = requests.post(URL, json=CHAT, timeout=60)
            if picker_marked_down or r.status_code != 500:
                assert r.status_code == 200, (r.status_code, r.text)
            answered += 1
            routed_again = "x-gateway-destination-endpoint-served" in r.headers
            assert answered < 2000, "the picker never came back:\n" + log.read_text()
        [restarted] = _pids_with("-m infergw.epp", str(workdir / "pool.yaml"))
        assert restarted != picker
        text = log.read_text()
        assert "picker exited with status -9" in text and "restarted picker" in text, text
        wait_http("http://127.0.0.1:9090/healthz", 30, up)

        os.killpg(up.pid, signal.SIGTERM)  # only a signal stops the stack
        assert up.wait(timeout=60) == 0, log.read_text()
        assert not _pids_with("-m infergw.epp", str(workdir / "pool.yaml"))


@pytest.mark.slow
def test_up_restarts_killed_controllers_without_leaving_their_pods(tmp_path):
    """The controllers' pods (each in its own session) stop when the controllers are
    SIGKILLed: they get SIGTERM from the kernel as their parent dies (api/lifetime.py), and
    whatever is left when the controllers start again is killed by the supervisor, so no pod
    of the dead run is left holding its address."""
    with _up(tmp_path, "--pods", "1") as (up, log, workdir):
        manifests = str(workdir / "manifests")
        [controllers] = _pids_with("-m infergw.controllers", manifests)
        old_pods = _pids_with("infergw.cli simulate", "--served-model-name=infergate-sim")
        old_pods = [p for p in old_pods if _descends_from(p, controllers)]
        assert old_pods
        os.kill(controllers, signal.SIGKILL)

        wait_until(lambda: b"restarted controllers" in log.read_bytes(), 60, up, "the restart")
        wait_until(lambda: not any(map(_alive, old_pods)), 30, up, "the old pods to die")
        [restarted] = _pids_with("-m infergw.controllers", manifests)
        assert restarted != controllers

        def answered() -> bool:
            r = requests.post(URL, json=CHAT, timeout=60)
            return r.status_code == 200 and "x-gateway-destination-endpoint-served" in r.headers

        wait_until(answered, 120, up, "a request routed to a pod of the new controllers")


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
    return False
