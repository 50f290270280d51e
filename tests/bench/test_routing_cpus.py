"""bench routing's CPU split: the pods on one set of CPUs, the router and the load generator on
the other, parsed from the command line and applied to real processes, every thread."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from infergw.bench.routing.cpus import CpuSplit, auto_split, parse_split, pin, process_tree

TWO_CPUS = len(os.sched_getaffinity(0)) >= 2


def test_auto_gives_a_quarter_at_least_one_to_the_router_and_the_rest_to_the_pods():
    assert auto_split({0, 1}) == CpuSplit(frozenset({0}), frozenset({1}))
    assert auto_split(set(range(8))) == CpuSplit(frozenset(range(6)), frozenset({6, 7}))
    assert auto_split({3}) is None  # one CPU: nothing to split


def test_explicit_lists_and_off():
    assert parse_split("0-2,5/3", set(range(6))) == CpuSplit(
        frozenset({0, 1, 2, 5}), frozenset({3})
    )
    assert parse_split("off", {0, 1}) is None
    assert parse_split("auto", {0, 1}) == auto_split({0, 1})


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("0/0", "in both sets"),
        ("0/7", "not available"),
        ("0", "PODS/ROUTER"),
        ("a/1", "not a CPU list"),
        ("0/", "not a CPU list"),
        ("0/1-", "not a CPU list"),
    ],
)
def test_bad_splits_say_what_is_wrong(text, said):
    with pytest.raises(ValueError, match=said):
        parse_split(text, {0, 1})


# A process with a second thread and a child process, all started before the pinning.
FAMILY = """
import subprocess, sys, threading, time
threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print(child.pid, flush=True)
time.sleep(60)
"""


@pytest.mark.skipif(not TWO_CPUS, reason="one CPU: nothing to pin apart")
def test_pin_moves_every_thread_of_a_process_and_its_children():
    target = frozenset({max(os.sched_getaffinity(0))})
    proc = subprocess.Popen([sys.executable, "-c", FAMILY], stdout=subprocess.PIPE, text=True)
    try:
        child = int(proc.stdout.readline())
        deadline = time.monotonic() + 10
        while len(os.listdir(f"/proc/{proc.pid}/task")) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert child in process_tree(proc.pid)
        tasks = [(p, int(t)) for p in (proc.pid, child) for t in os.listdir(f"/proc/{p}/task")]
        assert len(tasks) >= 3
        assert all(os.sched_getaffinity(t) != target for _, t in tasks)
        assert pin([proc.pid], target) == len(tasks)
        assert all(os.sched_getaffinity(t) == target for _, t in tasks)
    finally:
        proc.kill()
        proc.wait()
        subprocess.run(["kill", "-9", str(child)], check=False)


def test_a_bad_split_is_a_usage_error_and_a_good_one_is_recorded(monkeypatch, tmp_path, capsys):
    import json

    from infergw.bench.routing import cli

    with pytest.raises(SystemExit) as exit_:
        cli.main(["--cpu-split", "0/0", "--output-dir", str(tmp_path)])
    assert exit_.value.code == 2 and "in both sets" in capsys.readouterr().err
    seen = []
    monkeypatch.setattr(cli, "_run_with_progress", lambda points, s: seen.append(s) or [])
    monkeypatch.setattr(cli, "plot", lambda out, directory: [])
    argv = ["--routers", "vllm-router-round_robin", "--workloads", "no-reuse", "--rates", "1"]
    assert cli.main([*argv, "--output-dir", str(tmp_path)]) == 0
    (settings,) = seen
    assert settings.cpus == auto_split(os.sched_getaffinity(0))
    (written,) = tmp_path.glob("routing-*.json")
    recorded = json.loads(written.read_text())["settings"]["cpus"]
    assert recorded == (settings.cpus.describe() if settings.cpus else None)
    assert cli.main([*argv, "--cpu-split", "off", "--output-dir", str(tmp_path)]) == 0
    assert seen[-1].cpus is None
