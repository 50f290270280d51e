"""Two real pickers sharding the KV events over one real Redis, as `infergate up --pickers 2
--kv-index redis` runs them (the stack's own redis-server; the pickers'
`--kv-index-backend redis --kv-index-redis-shard`, epp/kv_shards.py), simulator pods
publishing over real ZMQ: each pod's events are ingested by exactly one picker, both
pickers' lookups see every pod's blocks, and when one picker is killed the other takes its
pods over within the liveness window, catching up from the pods' replay sockets (blocks
stored while nobody subscribed included)."""

from __future__ import annotations

import os
import signal
import time

import pytest
import requests

from infergw.bench.common import process_gone
from infergw.epp.replica_members import HEARTBEAT_INTERVAL, LIVENESS, owner
from infergw.stack.local import LocalStack, StackConfig
from infergw.stack.ports import free_port, free_stack_ports
from tests.e2e.gateway_config import MODEL, config
from tests.e2e.stack_fixtures import prefix_scores
from tests.redis_server import require_redis_server

pytestmark = pytest.mark.slow

PRECISE = config(("precise-prefix-cache-scorer", 1), ("max-score-picker", None))
SIM = ["--sim-time-scale", "0.2", "--block-size", "16"]
PODS = 4


def prefix(i: int) -> str:
    return f"Document {i}: " + " ".join(f"fact{i}-{j}" for j in range(60)) + "\nQuestion: "


def metrics(stack: LocalStack, index: int) -> str:
    url = f"http://127.0.0.1:{stack.picker_ports(index).metrics}/metrics"
    return requests.get(url, timeout=5).text


def subscribed(stack: LocalStack, index: int) -> set[str]:
    """The pods picker `index` subscribes to (infergate_kvindex_subscribed{pod})."""
    head = 'infergate_kvindex_subscribed{pod="'
    return {
        line[len(head) :].split('"', 1)[0]
        for line in metrics(stack, index).splitlines()
        if line.startswith(head)
    }


def replicas(stack: LocalStack, index: int) -> float:
    for line in metrics(stack, index).splitlines():
        if line.startswith("infergate_epp_replicas_live "):
            return float(line.split()[1])
    return 0.0


def matched(stack: LocalStack, index: int, text: str) -> dict[str, int]:
    """What picker `index`'s index (read from Redis) says each pod holds of `text`."""
    return prefix_scores(stack.picker_ports(index).metrics, MODEL, text)


def straight_to(pod: str, text: str) -> None:
    """A completion sent to the pod itself: no picker routes it, so no speculative entry
    anywhere; its blocks reach the pickers only through the pod's KV events."""
    r = requests.post(
        f"http://{pod}/v1/completions",
        json={"model": MODEL, "prompt": text, "max_tokens": 2},
        timeout=30,
    )
    assert r.status_code == 200, r.text


def wait_for(predicate, timeout: float, what: str) -> float:
    """Seconds it took."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, f"timed out: {what}"
        time.sleep(0.05)
    return time.monotonic() - start


def split_stack(tmp_path) -> LocalStack:
    """Two pickers sharding PODS pods over the stack's own redis-server, the pods' ports
    chosen so that each picker owns half (rendezvous hashing over random ports leaves one
    picker none 1 time in 8)."""
    require_redis_server()
    ports = free_stack_ports(PODS, True, 2)
    binds = [f"tcp://127.0.0.1:{ports.picker_ports(i).replica_sync}" for i in (0, 1)]
    pod_ports: list[int] = []
    owned = {b: 0 for b in binds}
    while len(pod_ports) < PODS:
        port = free_port()
        mine = owner(f"127.0.0.1:{port}", binds)
        if port not in pod_ports and owned[mine] < PODS // 2:
            pod_ports.append(port)
            owned[mine] += 1
    cfg_path = tmp_path / "epp-config.yaml"
    cfg_path.write_text(PRECISE)
    return LocalStack(
        StackConfig(
            workdir=tmp_path,
            pods=PODS,
            ports=ports,
            pod_ports=pod_ports,
            picker_config=cfg_path,
            pickers=2,
            sim_args=SIM,
            kv_index="redis",  # as `infergate up --pickers 2 --kv-index redis`
        )
    ).start()


def test_each_pod_has_one_subscriber_both_read_all_and_a_dead_ones_pods_move(tmp_path):
    stack = split_stack(tmp_path)
    try:
        pods = stack.pod_addresses
        wait_for(lambda: replicas(stack, 0) == replicas(stack, 1) == 2, 20, "both see both")

        def split() -> bool:
            a, b = subscribed(stack, 0), subscribed(stack, 1)
            return not a & b and a | b == set(pods)

        wait_for(split, 10, "the pods split between the pickers, one subscriber each")
        shards = [subscribed(stack, 0), subscribed(stack, 1)]
        assert len(shards[0]) == len(shards[1]) == PODS // 2, shards  # as the hashing says
        for i, pod in enumerate(pods):
            straight_to(pod, prefix(i) + "first?")
        for reader in (0, 1):  # each sees every pod's blocks, its own shard's and the other's
            for i, pod in enumerate(pods):
                wait_for(
                    lambda r=reader, i=i, pod=pod: matched(stack, r, prefix(i) + "x")[pod] > 0,
                    10,
                    f"picker {reader} to see pod {i}'s blocks",
                )
        assert subscribed(stack, 0) == shards[0] and subscribed(stack, 1) == shards[1]

        # Kill one; a pod of its shard stores blocks while nobody subscribes to it (its owner
        # is dead, the survivor has not noticed yet).
        victim, survivor = 0, 1
        orphan = sorted(shards[victim])[0]
        proc = stack.procs[stack.picker_name(victim)]
        os.killpg(proc.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        straight_to(orphan, prefix(10) + "while nobody listens")
        wait_for(lambda: process_gone(proc.pid), 10, "the killed picker to be gone")
        proc.wait()
        wait_for(
            lambda: subscribed(stack, survivor) == set(pods), 15, "the survivor to take all pods"
        )
        took = time.monotonic() - killed_at
        print(f"the survivor subscribed to every pod {took:.2f}s after the kill")
        assert took <= LIVENESS + 3 * HEARTBEAT_INTERVAL + 2.0  # + a loaded machine's slack
        assert replicas(stack, survivor) == 1
        # Nothing lost that the replay holds: what the orphan stored unheard, and every
        # block the dead picker had written.
        wait_for(
            lambda: matched(stack, survivor, prefix(10) + "x")[orphan] > 0,
            10,
            "the survivor to replay the orphan's unheard blocks",
        )
        for i, pod in enumerate(pods):
            assert matched(stack, survivor, prefix(i) + "x")[pod] > 0, (i, pod)
        straight_to(orphan, prefix(11) + "after the takeover")
        wait_for(
            lambda: matched(stack, survivor, prefix(11) + "x")[orphan] > 0,
            10,
            "the survivor to follow the orphan live",
        )
    finally:
        stack.stop()
