"""A Service's EndpointSlice (discovery.k8s.io/v1) → the ready addresses of one named port.

The endpoints controller writes one or more slices per Service, labelled with the Service's
name, and marks each endpoint ready from its pod's readiness (a terminating pod is not ready),
so a reader of the slices learns which pods serve a port without reading the pods.

Slices come from the API server, yet `ready_addresses` trusts nothing: a slice of the wrong
shape, an address that is not an IP of the slice's family, a port out of range are left out
and named in `skipped`, one reason per part left out; it never raises.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

SERVICE_NAME_LABEL = "kubernetes.io/service-name"  # which Service a slice belongs to
MAX_ENDPOINTS = 1000  # per slice: the API server's own limit; more is not a real slice
_FAMILIES = {"IPv4": ipaddress.IPv4Address, "IPv6": ipaddress.IPv6Address}

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class SocketAddress:
    ip: IPAddress
    port: int

    def __str__(self) -> str:
        host = f"[{self.ip}]" if self.ip.version == 6 else str(self.ip)
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class SliceAddresses:
    """The ready endpoints of one slice at the named port, and why parts were left out
    (malformed, address_type, no_port, bad_port, not_an_ip, too_many_endpoints)."""

    addresses: frozenset[SocketAddress]
    skipped: tuple[str, ...] = ()


def ready_addresses(obj: Any, port_name: str) -> SliceAddresses:
    """The ready addresses of `obj`'s endpoints at the port named `port_name`."""
    if not isinstance(obj, dict):
        return SliceAddresses(frozenset(), ("malformed",))
    address_type = obj.get("addressType")
    family = _FAMILIES.get(address_type) if isinstance(address_type, str) else None
    if family is None:  # FQDN slices, or anything else: no IP to connect to
        return SliceAddresses(frozenset(), ("address_type",))
    endpoints = obj.get("endpoints") or []
    if not isinstance(endpoints, list):
        return SliceAddresses(frozenset(), ("malformed",))
    if not endpoints:  # e.g. the placeholder slice of a Service without pods, which has no ports
        return SliceAddresses(frozenset())
    port = _named_port(obj.get("ports"), port_name)
    if isinstance(port, str):
        return SliceAddresses(frozenset(), (port,))
    skipped = ["too_many_endpoints"] if len(endpoints) > MAX_ENDPOINTS else []
    found = set()
    for endpoint in endpoints[:MAX_ENDPOINTS]:
        ip = _ready_ip(endpoint, family)
        if isinstance(ip, str):
            skipped.append(ip)
        elif ip is not None:
            found.add(SocketAddress(ip, port))
    return SliceAddresses(frozenset(found), tuple(skipped))


def _named_port(ports: Any, name: str) -> int | str:
    """The port number called `name`, or why there is none to use."""
    if not isinstance(ports, list):
        return "no_port" if ports is None else "malformed"
    for port in ports:
        if isinstance(port, dict) and port.get("name") == name:
            number = port.get("port")
            if isinstance(number, int) and not isinstance(number, bool) and 0 < number < 65536:
                return number
            return "bad_port"
    return "no_port"


def _ready_ip(endpoint: Any, family: type[IPAddress]) -> IPAddress | str | None:
    """The endpoint's address if it is ready, None if it is not, or why it cannot be used."""
    if not isinstance(endpoint, dict):
        return "malformed"
    conditions = endpoint.get("conditions") or {}
    ready = conditions.get("ready") if isinstance(conditions, dict) else "?"
    if ready is not None and not isinstance(ready, bool):
        return "malformed"
    if ready is False:  # unset means unknown, which the API says to read as ready
        return None
    addresses = endpoint.get("addresses")
    if not isinstance(addresses, list) or not addresses:
        return "malformed"
    try:  # the addresses of one endpoint are the same pod: the first is enough
        ip = family(addresses[0]) if isinstance(addresses[0], str) else None
    except ValueError:
        ip = None
    if ip is None or ip.is_unspecified or ip.is_multicast or getattr(ip, "scope_id", None):
        return "not_an_ip"
    return ip
