"""Ports for local stacks, tests and benchmarks: the one place that hands out free ones, so two
servers started by one process (a test, a benchmark) never get the same port."""

from __future__ import annotations

import os
import random
import socket
from dataclasses import astuple, dataclass, field
from pathlib import Path

from infergw.api.names import KV_EVENTS_PORT, KV_REPLAY_PORT
from infergw.api.pod_ports import FIRST_HOST_PORT

# Picker i of `infergate up --pickers N` listens on picker 0's ports + i * this (9102, 9103,
# 9190, 9104 for the second): far enough apart that no picker's port is another's.
PICKER_PORT_STRIDE = 100


@dataclass(frozen=True, slots=True)
class PickerPorts:
    """One picker process's ports: ext_proc, its gRPC health, metrics and debug pages, and
    the PUB that shares its speculative KV entries with the other pickers."""

    grpc: int
    health: int
    metrics: int
    replica_sync: int


@dataclass(frozen=True, slots=True)
class RouterPorts:
    """The body-based router's ports (several Models behind one Envoy): ext_proc, its gRPC
    health, metrics."""

    grpc: int
    health: int
    metrics: int


@dataclass(slots=True)
class StackPorts:
    """Where a local stack listens; the defaults are what `infergate up` uses."""

    envoy: int = 8080
    envoy_admin: int = 9901
    picker: int = 9002
    picker_health: int = 9003
    picker_metrics: int = 9090
    picker_replica_sync: int = 9004  # used with several pickers only
    first_pod: int = 8000
    kv_events: int = KV_EVENTS_PORT
    kv_replay_base: int = KV_REPLAY_PORT  # pod i's KV-event replay socket is on kv_replay_base + i
    # Set: each pod binds its own KV-event PUB on kv_pub_base + i and the picker connects to
    # every pod (per-pod mode, what other routers' KV-event sources need too). Unset: the
    # picker binds kv_events and the pods connect to it (central mode).
    kv_pub_base: int | None = None
    controllers_metrics: int = 9091
    # The body-based router, which runs with several Models only.
    router: RouterPorts = field(default_factory=lambda: RouterPorts(9012, 9013, 9092))
    # The ports of pickers 1..N-1 (picker 0's are the three above); unset, they follow
    # PICKER_PORT_STRIDE. free_stack_ports fills it with free ones.
    more_pickers: list[PickerPorts] = field(default_factory=list)

    def picker_ports(self, index: int) -> PickerPorts:
        """Picker `index`'s ports (0: picker, picker_health, picker_metrics)."""
        if index == 0:
            return PickerPorts(
                self.picker, self.picker_health, self.picker_metrics, self.picker_replica_sync
            )
        if index <= len(self.more_pickers):
            return self.more_pickers[index - 1]
        first, step = self.picker_ports(0), index * PICKER_PORT_STRIDE
        return PickerPorts(*(port + step for port in astuple(first)))


_handed_out: set[int] = set()

# Ports are chosen below the kernel's ephemeral range, where the source ports of outgoing
# connections come from: a port handed out is not bound until its server starts, and one from
# the ephemeral range could meanwhile become the source port of any connection on the machine
# (the server then fails with "address already in use" — a busy machine's flake).
LOWEST_PORT = 10_000  # above the well-known and registered ports local services tend to hold
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_ATTEMPTS = 2_000
_rng = random.Random()  # its own: a test's seeded global random must not repeat our choices
# Processes handing out ports at the same time (pytest-xdist's workers: each remembers only
# its own) take a slice each: "K/N", the K-th (from 0) of N equal slices of the range below.
# What they start inherits it.
PORT_SLICE_ENV = "INFERGATE_PORT_SLICE"


def _ephemeral_start() -> int:
    """The first port of the kernel's ephemeral range (Linux; 32768 elsewhere, as on macOS's
    49152 the range below is as safe)."""
    try:
        return int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _free(port: int) -> bool:
    """Whether a server could bind `port` now. SO_REUSEADDR as every server here sets it
    (aiohttp, grpc, Envoy, ZMQ): a port whose last connection lingers in TIME_WAIT is free."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _kernel_port() -> int:
    """A port the kernel picks (from the ephemeral range): the fallback where the range
    below it is too small or full."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_slice(low: int, top: int) -> tuple[int, int]:
    """[low, top) narrowed to this process's slice ($INFERGATE_PORT_SLICE), else whole."""
    said = os.environ.get(PORT_SLICE_ENV, "")
    if not said:
        return low, top
    k, sep, n = said.partition("/")
    try:
        index, count = int(k), int(n)
    except ValueError:
        index, count = -1, 0
    if not sep or not 0 <= index < count:
        raise ValueError(f"${PORT_SLICE_ENV}={said!r}: give K/N with 0 <= K < N, e.g. 0/2")
    width = (top - low) // count
    return low + index * width, low + (index + 1) * width


def port_range() -> tuple[int, int]:
    """[low, top): where free_port() draws from in this process."""
    return port_slice(LOWEST_PORT, min(_ephemeral_start(), FIRST_HOST_PORT))


def free_port() -> int:
    """A port free now, below the ephemeral range and the one-address pods' ports
    (api/pod_ports.py: the standalone runtime may take one before its server binds it), in
    this process's slice of that range, and not handed out before in this process."""
    low, top = port_range()
    if top - low >= 1_000:
        for _ in range(_ATTEMPTS):
            port = _rng.randrange(low, top)
            if port not in _handed_out and _free(port):
                _handed_out.add(port)
                return port
    while True:
        port = _kernel_port()
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def free_port_run(n: int) -> int:
    """The first of n consecutive ports that are free now (pod i's socket is on base + i)."""
    for _ in range(200):
        base = free_port()
        run = range(base + 1, base + n)
        if base + n < 65535 and not _handed_out.intersection(run) and all(map(_free, run)):
            _handed_out.update(run)
            return base
    raise RuntimeError(f"no run of {n} free ports")


def free_stack_ports(pods: int = 1, per_pod_kv: bool = False, pickers: int = 1) -> StackPorts:
    """A local stack's ports, all free now: `pods` consecutive KV replay ports and, with
    per_pod_kv, `pods` consecutive KV-event PUB ports (each pod binds its own); ports for
    `pickers` picker processes. Several pickers need per-pod KV events (only one process can
    bind the central socket), so pickers > 1 implies per_pod_kv."""
    per_pod_kv = per_pod_kv or pickers > 1
    return StackPorts(
        envoy=free_port(),
        envoy_admin=free_port(),
        picker=free_port(),
        picker_health=free_port(),
        picker_metrics=free_port(),
        picker_replica_sync=free_port(),
        kv_events=free_port(),
        kv_replay_base=free_port_run(pods),
        kv_pub_base=free_port_run(pods) if per_pod_kv else None,
        controllers_metrics=free_port(),
        router=RouterPorts(free_port(), free_port(), free_port()),
        more_pickers=[
            PickerPorts(free_port(), free_port(), free_port(), free_port())
            for _ in range(pickers - 1)
        ],
    )
