"""stack/ports.py, the one source of free ports for tests and benchmarks: within a process no
port is handed out twice, runs are consecutive and bindable, and a stack's ports are distinct."""

from __future__ import annotations

import socket

from stack.ports import free_port, free_port_run, free_stack_ports


def bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_no_port_is_handed_out_twice():
    base = free_port_run(8)
    run = set(range(base, base + 8))
    singles = [free_port() for _ in range(200)]
    assert len(set(singles)) == len(singles)
    assert run.isdisjoint(singles)
    assert all(map(bindable, run))


def test_a_stacks_ports_are_distinct_and_free():
    pods = 4
    ports = free_stack_ports(pods, per_pod_kv=True)
    replay = range(ports.kv_replay_base, ports.kv_replay_base + pods)
    pub = range(ports.kv_pub_base, ports.kv_pub_base + pods)
    singles = [
        ports.envoy,
        ports.envoy_admin,
        ports.picker,
        ports.picker_health,
        ports.picker_metrics,
        ports.kv_events,
        ports.controllers_metrics,
    ]
    everything = [*singles, *replay, *pub]
    assert len(set(everything)) == len(everything)
    assert all(map(bindable, everything))


def test_central_kv_mode_leaves_the_pub_base_unset():
    assert free_stack_ports(2).kv_pub_base is None
