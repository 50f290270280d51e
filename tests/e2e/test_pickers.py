"""Two pickers behind one real Envoy (`infergate up --pickers 2`): both take requests, and when
one is killed under load the other takes every new request at once; only requests that were
in flight on the killed one may fail, in FailOpen and FailClose alike."""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, field

import pytest
import requests

from infergw.bench.common import process_gone
from infergw.stack.local import LocalStack
from tests.e2e.gateway_config import MODEL
from tests.e2e.stack_fixtures import make_stack

pytestmark = pytest.mark.slow

CLIENTS = 8
# Several KV blocks long: the pickers hold it speculatively and tell each other.
PROMPT = "tell me a story about " + " ".join(f"word{i}" for i in range(60))
TOTAL = "inference_objective_request_total"
SHARED_APPLIED = 'infergate_epp_replica_sync_records_total{outcome="applied"}'


def picker_metric(stack: LocalStack, index: int, series: str) -> float:
    """A metric of picker `index`: a name (summed over its labels) or one labelled series."""
    url = f"http://127.0.0.1:{stack.picker_ports(index).metrics}/metrics"
    total = 0.0
    for line in requests.get(url, timeout=5).text.splitlines():
        head, _, value = line.rpartition(" ")
        if head == series or ("{" not in series and head.startswith(series + "{")):
            total += float(value)
    return total


def ext_proc_host(stack: LocalStack, index: int) -> dict[str, int]:
    """Envoy's counters and gauges for picker `index` in its ext_proc cluster, read at one
    moment (one /clusters answer): rq_total (streams ever sent to it), rq_active (open now)."""
    url = f"http://127.0.0.1:{stack.cfg.ports.envoy_admin}/clusters"
    host = f"endpoint-picker::127.0.0.1:{stack.picker_ports(index).grpc}::"
    stats = {}
    for line in requests.get(url, timeout=5).text.splitlines():
        if line.startswith(host):
            name, _, value = line.removeprefix(host).partition("::")
            if value.isdigit():
                stats[name] = int(value)
    assert {"rq_total", "rq_active"} <= stats.keys(), f"Envoy has no ext_proc host {index}"
    return stats


@dataclass
class Outcome:
    started: float
    ended: float
    status: int  # 0: the connection failed


@dataclass
class Load:
    """CLIENTS threads sending completions through Envoy until stopped."""

    url: str
    outcomes: list[Outcome] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Load:
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(CLIENTS)]
        for t in self.threads:
            t.start()
        return self

    def _client(self) -> None:
        with requests.Session() as session:
            while not self.stop.is_set():
                started = time.monotonic()
                try:
                    r = session.post(
                        self.url + "/v1/completions",
                        json={"model": MODEL, "prompt": PROMPT, "max_tokens": 16},
                        timeout=30,
                    )
                    status = r.status_code
                except requests.RequestException:
                    status = 0
                with self.lock:
                    self.outcomes.append(Outcome(started, time.monotonic(), status))

    def finish(self) -> list[Outcome]:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)
        with self.lock:
            return list(self.outcomes)

    def done(self) -> int:
        with self.lock:
            return len(self.outcomes)


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise TimeoutError(what)


@pytest.mark.parametrize("failure_mode", ["FailOpen", "FailClose"])
def test_killing_one_picker_under_load_fails_only_its_own_requests(tmp_path, failure_mode):
    stack = make_stack(tmp_path, pickers=2, failure_mode=failure_mode)
    try:
        load = Load(stack.url).start()
        # Both pickers take streams (Envoy spreads them over its ext_proc cluster).
        wait_for(
            lambda: all(picker_metric(stack, i, TOTAL) >= 5 for i in (0, 1)),
            30,
            "both pickers to serve requests",
        )
        # Each holds the other's speculative KV entries (epp/replica_sync.py).
        wait_for(
            lambda: all(picker_metric(stack, i, SHARED_APPLIED) >= 1 for i in (0, 1)),
            10,
            "each picker to apply the other's speculative entries",
        )
        victim = stack.procs[stack.picker_name(1)]
        # The requests that may fail are those Envoy sent the victim: the streams it has open
        # to it now, and every one it opens to it from now on (rq_total counts a stream when
        # Envoy sends it; read again once the victim is long gone).
        before = ext_proc_host(stack, 1)
        signalled_at = time.monotonic()
        os.killpg(victim.pid, signal.SIGKILL)
        wait_for(lambda: process_gone(victim.pid), 10, "the killed picker to be gone")
        # Gone, its sockets closed; Envoy learns it when it handles the closed connections, a
        # few ms later. A request it dispatched before then went to the dead picker.
        wait_for(lambda: ext_proc_host(stack, 1)["cx_active"] == 0, 10, "Envoy to see it gone")
        killed_at = time.monotonic()
        victim.wait()
        survivor_before = picker_metric(stack, 0, TOTAL)
        done_at_kill = load.done()
        wait_for(lambda: load.done() >= done_at_kill + 60, 60, "60 more requests after the kill")
        outcomes = load.finish()
        survivor_after = picker_metric(stack, 0, TOTAL)
        after = ext_proc_host(stack, 1)
        may_fail = before["rq_active"] + after["rq_total"] - before["rq_total"]
    finally:
        stack.stop()

    failed = [o for o in outcomes if o.status != 200]
    # Requests that started while the picker was dying (until Envoy saw its connections close)
    # may have been sent to it without a stream Envoy counted, so they may fail too.
    dying = [o for o in outcomes if signalled_at <= o.started < killed_at]
    may_fail += len(dying)
    in_flight = [o for o in outcomes if o.started < killed_at < o.ended]
    started_after = [o for o in outcomes if o.started > killed_at]
    print(f"Envoy's ext_proc streams to the killed picker: {before} before the kill, {after} after")
    print(
        f"{failure_mode}: {len(outcomes)} requests, {len(in_flight)} in flight at the kill "
        f"(at most {may_fail:.0f} on the killed picker), {len(failed)} failed "
        f"({[o.status for o in failed]}), {len(started_after)} started after it"
    )
    # Every failure was a request in flight when the picker died, and no more than it held.
    assert all(o.started < killed_at for o in failed), [o.status for o in failed]
    assert len(failed) <= may_fail, (len(failed), may_fail)
    # The survivor took the new requests at once: every one started after the kill succeeded.
    assert len(started_after) >= 60 and all(o.status == 200 for o in started_after)
    assert survivor_after - survivor_before >= 60


SCRAPES = "infergate_epp_metrics_scrapes_total"
SETTLED = 40  # shared pages applied: two seconds of one owned pod's rounds at 50 ms


def test_two_pickers_scrape_each_pod_once_between_them(tmp_path):
    """epp/scrape_shares.py through the local stack: under load (busy pods never rest), the
    two pickers together ask the pods for about one picker's worth of pages, and each knows
    every pod's numbers."""
    pods = 3
    stack = make_stack(tmp_path, pods=pods, pickers=2)
    try:
        load = Load(stack.url).start()
        wait_for(
            lambda: all(picker_metric(stack, i, TOTAL) >= 5 for i in (0, 1)),
            30,
            "both pickers to serve requests",
        )
        # The owners are settled once each picker hears the other's pages round after round
        # (a picker with fresh shared numbers for a pod stops scraping it itself): a
        # condition, not a time, since heartbeats lag on a loaded machine.
        wait_for(
            lambda: all(picker_metric(stack, i, SHARED_APPLIED) >= SETTLED for i in (0, 1)),
            30,
            f"both pickers to apply {SETTLED} shared pages",
        )
        before = [picker_metric(stack, i, SCRAPES) for i in (0, 1)]
        t0 = time.monotonic()
        time.sleep(3.0)
        after = [picker_metric(stack, i, SCRAPES) for i in (0, 1)]
        elapsed = time.monotonic() - t0
        load.finish()
        applied = [picker_metric(stack, i, SHARED_APPLIED) for i in (0, 1)]
    finally:
        stack.stop()
    per_second = sum(a - b for a, b in zip(after, before, strict=True)) / elapsed
    one_picker = pods / 0.05  # every pod every 50 ms
    print(f"scrapes/s, both pickers: {per_second:.1f} (one picker scraping alone: {one_picker})")
    # Each picker scraping every pod would be 2 × one_picker; sharing is one_picker at most
    # (less when a loaded loop stretches the interval), fallback rounds aside.
    assert 0 < per_second <= 1.3 * one_picker
    assert all(a > 0 for a in after) and all(n > 0 for n in applied)
