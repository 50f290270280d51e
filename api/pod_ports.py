"""How standalone mode's pods share this machine: an address each, or one address with ports of
their own.

`many` (Linux's default): every pod takes its own loopback address, 127.0.0.2 and up, and binds
the ports its manifest names, as pods have their own IPs in a cluster. `one` (macOS's default,
which has 127.0.0.1 alone): every pod is on 127.0.0.1 and each of its container ports is moved
to a free port of its own. The runtime tells the pod's processes by rewriting the port in their
command lines, and tells the rest by the pod's `infergate.io/host-ports` annotation
(cluster/pool.py), which the picker, Envoy's EDS file and the P/D sidecar read from the pool file.
`auto` picks `many` where 127.0.0.2 can be bound, else `one`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from infergw.api.loopback import missing_loopback

ONE, MANY, AUTO = "one", "many", "auto"
POD_ADDRESS_MODES = (ONE, MANY, AUTO)
POD_ADDRESS_HELP = {
    MANY: "many: each pod on its own loopback address, 127.0.0.2 and up",
    ONE: "one: every pod on 127.0.0.1, its ports moved to free ones (infergate.io/host-ports)",
}
ONE_ADDRESS = "127.0.0.1"
# Where one-address mode looks for pods' ports: above the ports local stacks and tests take
# (stack/ports.py stays below), below the kernel's ephemeral range (Linux's from 32768, macOS's
# from 49152), so no outgoing connection's source port takes one between its choice and its bind.
FIRST_HOST_PORT = 20_000
LAST_HOST_PORT = 32_767
_PAIR = re.compile(r"([0-9]{1,5})=([0-9]{1,5})")


def resolve_pod_addresses(mode: str) -> str:
    """`one` or `many`: `auto` becomes `many` where this machine has 127.0.0.2, else `one`."""
    if mode not in POD_ADDRESS_MODES:
        raise ValueError(f"pod addresses {mode!r}: expected one of {', '.join(POD_ADDRESS_MODES)}")
    if mode != AUTO:
        return mode
    return MANY if missing_loopback() is None else ONE


@dataclass(frozen=True, slots=True)
class HostPorts:
    """A pod's container ports → the ports it is reached at on its podIP; a port not listed is
    reached at itself (every port, without the annotation)."""

    moved: tuple[tuple[int, int], ...] = ()

    @classmethod
    def parse(cls, text: str) -> HostPorts:
        """`8000=20417,5557=20418`; ValueError saying which entry is wrong."""
        pairs: dict[int, int] = {}
        for entry in (e.strip() for e in text.split(",")):
            if not entry:
                continue
            m = _PAIR.fullmatch(entry)
            if m is None:
                raise ValueError(f"{entry!r} is not CONTAINER_PORT=HOST_PORT")
            container, host = int(m.group(1)), int(m.group(2))
            if not (0 < container < 65536 and 0 < host < 65536):
                raise ValueError(f"{entry!r}: a port is 1-65535")
            if pairs.setdefault(container, host) != host:
                raise ValueError(f"port {container} is given twice")
        return cls(tuple(sorted(pairs.items())))

    def __str__(self) -> str:
        return ",".join(f"{c}={h}" for c, h in self.moved)

    def of(self, port: int) -> int:
        return next((h for c, h in self.moved if c == port), port)

    def as_dict(self) -> dict[int, int]:
        return dict(self.moved)
