"""stack/ports.py, the one source of free ports for tests and benchmarks: within a process no
port is handed out twice, runs are consecutive, and a stack's ports are distinct and free."""

from __future__ import annotations

import socket
from contextlib import ExitStack
from dataclasses import astuple
from pathlib import Path

import pytest

from infergw.stack import ports
from infergw.stack.ports import (
    LOWEST_PORT,
    PICKER_PORT_STRIDE,
    PickerPorts,
    StackPorts,
    _free,
    free_port,
    free_port_run,
    free_stack_ports,
)


def bind_all(ports: list[int]) -> None:
    """Bind every port at once, as the servers do (SO_REUSEADDR: a port in TIME_WAIT is
    free to them): fails if one is taken or listed twice."""
    with ExitStack() as held:
        for port in ports:
            sock = held.enter_context(socket.socket())
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))
            sock.listen()  # two listeners on one port fail even with SO_REUSEADDR


def test_no_port_is_handed_out_twice():
    base = free_port_run(8)
    singles = [free_port() for _ in range(200)]
    bind_all([*range(base, base + 8), *singles])


def test_a_stacks_ports_are_distinct_and_free():
    pods = 4
    ports = free_stack_ports(pods, per_pod_kv=True)
    bind_all(
        [
            ports.envoy,
            ports.envoy_admin,
            ports.picker,
            ports.picker_health,
            ports.picker_metrics,
            ports.kv_events,
            ports.controllers_metrics,
            *range(ports.kv_replay_base, ports.kv_replay_base + pods),
            *range(ports.kv_pub_base, ports.kv_pub_base + pods),
        ]
    )


def test_central_kv_mode_leaves_the_pub_base_unset():
    assert free_stack_ports(2).kv_pub_base is None


def test_every_picker_gets_its_own_free_ports_and_per_pod_kv_events():
    ports = free_stack_ports(2, pickers=3)
    assert ports.kv_pub_base is not None  # one process alone could bind the central socket
    pickers = [ports.picker_ports(i) for i in range(3)]
    assert pickers[0] == PickerPorts(
        ports.picker, ports.picker_health, ports.picker_metrics, ports.picker_replica_sync
    )
    bind_all([port for p in pickers for port in astuple(p)])


def test_the_default_pickers_follow_the_stride():
    second = StackPorts().picker_ports(1)
    assert astuple(second) == tuple(p + PICKER_PORT_STRIDE for p in (9002, 9003, 9090, 9004))


def test_ports_come_from_below_the_ephemeral_range():
    """An outgoing connection's source port never takes a port handed out but not yet bound
    (the 'address already in use' flake of a busy machine)."""
    first_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = [free_port() for _ in range(100)]
    assert all(LOWEST_PORT <= p < first_ephemeral for p in ports), ports


def test_a_port_in_time_wait_counts_as_free():
    """Servers here bind with SO_REUSEADDR, so a port whose last connection lingers in
    TIME_WAIT is theirs to bind; the probe must not call it taken ('no run of 4 free ports'
    after other load tests)."""
    port = free_port()
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", port))
        server.listen()
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = server.accept()
        accepted.close()  # the server side closes first: its end lingers in TIME_WAIT
        client.close()
    assert _free(port)


def test_processes_handing_out_ports_at_once_take_disjoint_slices(monkeypatch):
    """pytest-xdist's workers (tests/conftest.py): each draws from its own slice, all of the
    range covered but a remainder, none overlapping."""
    monkeypatch.delenv(ports.PORT_SLICE_ENV, raising=False)
    whole = ports.port_range()
    slices = []
    for k in range(3):
        monkeypatch.setenv(ports.PORT_SLICE_ENV, f"{k}/3")
        slices.append(ports.port_range())
        low, top = slices[-1]
        assert all(low <= ports.free_port() < top for _ in range(20))
    assert [s[0] for s in slices[1:]] == [s[1] for s in slices[:-1]]
    assert slices[0][0] == whole[0] and whole[1] - slices[-1][1] < 3


@pytest.mark.parametrize("said", ["2/2", "-1/2", "1", "a/b", "0/0", "1/2/3"])
def test_a_bad_port_slice_says_how_to_write_one(monkeypatch, said):
    monkeypatch.setenv(ports.PORT_SLICE_ENV, said)
    with pytest.raises(ValueError, match=r"INFERGATE_PORT_SLICE.*give K/N"):
        ports.free_port()
