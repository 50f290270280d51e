"""cluster/endpoint_slices.py: a Service's EndpointSlice → the ready addresses of one named
port. Not-ready endpoints are left out quietly; whatever cannot be used (a slice of the wrong
shape, an address that is no IP of the slice's family, a port out of range or missing) is left
out and named, and nothing raises."""

from __future__ import annotations

import copy
import ipaddress
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from infergw.cluster.endpoint_slices import (
    MAX_ENDPOINTS,
    SocketAddress,
    ready_addresses,
)
from tests.fuzzing import fuzz_settings

PORT = "replica-sync"


def endpoint(ip: str, ready: bool | None = True) -> dict[str, Any]:
    conditions = {} if ready is None else {"ready": ready}
    return {"addresses": [ip], "conditions": conditions, "targetRef": {"kind": "Pod"}}


def a_slice(*endpoints: dict[str, Any], family: str = "IPv4", port: Any = 9004) -> dict:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": "s", "namespace": "default"},
        "addressType": family,
        "endpoints": list(endpoints),
        "ports": [
            {"name": "grpc", "port": 9002, "protocol": "TCP"},
            {"name": PORT, "port": port, "protocol": "TCP"},
        ],
    }


def at(ip: str, port: int = 9004) -> SocketAddress:
    return SocketAddress(ipaddress.ip_address(ip), port)


def test_ready_endpoints_at_the_named_port():
    found = ready_addresses(
        a_slice(
            endpoint("10.0.0.1"), endpoint("10.0.0.2", ready=False), endpoint("10.0.0.3", None)
        ),
        PORT,
    )
    # Unset readiness is "unknown", which the API says to read as ready; not ready is quiet.
    assert found.addresses == {at("10.0.0.1"), at("10.0.0.3")}
    assert found.skipped == ()
    assert ready_addresses(a_slice(endpoint("10.0.0.1")), "grpc").addresses == {
        at("10.0.0.1", 9002)
    }


def test_ipv6_slices_and_how_an_address_prints():
    found = ready_addresses(a_slice(endpoint("fd00::7"), family="IPv6"), PORT)
    assert found.addresses == {at("fd00::7")}
    assert str(at("fd00::7")) == "[fd00::7]:9004" and str(at("10.0.0.1")) == "10.0.0.1:9004"


def test_an_empty_slice_is_not_a_problem():
    """The placeholder slice of a Service without ready pods has no endpoints and no ports."""
    placeholder = a_slice()
    placeholder["ports"] = None
    assert ready_addresses(placeholder, PORT).skipped == ()
    del placeholder["endpoints"]
    assert ready_addresses(placeholder, PORT).addresses == frozenset()


def test_hostile_endpoints_are_skipped_and_named_the_rest_kept():
    found = ready_addresses(
        a_slice(
            endpoint("10.0.0.1"),
            endpoint("not-an-ip"),
            endpoint("fd00::1"),  # the wrong family for an IPv4 slice
            endpoint("010.0.0.2"),  # leading zeros: ambiguous, refused
            endpoint("0.0.0.0"),
            endpoint("224.0.0.1"),
            {"addresses": [7]},
            {"addresses": []},
            {"conditions": {"ready": True}},
            {"addresses": ["10.0.0.3"], "conditions": {"ready": "yes"}},
            {"addresses": ["10.0.0.4"], "conditions": ["ready"]},
            "an endpoint",
        ),
        PORT,
    )
    assert found.addresses == {at("10.0.0.1")}
    assert sorted(found.skipped) == sorted(["not_an_ip"] * 6 + ["malformed"] * 5)


def test_a_scoped_ipv6_address_is_not_a_peer():
    assert ready_addresses(a_slice(endpoint("fe80::1%eth0"), family="IPv6"), PORT).skipped == (
        "not_an_ip",
    )


def test_hostile_slices_yield_nothing_and_say_why():
    def with_(**changes: Any) -> dict:
        obj = a_slice(endpoint("10.0.0.1"))
        obj.update(changes)
        return obj

    cases = {
        "malformed": [None, "a slice", [], with_(endpoints={"a": 1})],
        "address_type": [with_(addressType="FQDN"), with_(addressType=None)],
        "no_port": [with_(ports=[{"name": "grpc", "port": 9002}]), with_(ports=None)],
        "bad_port": [
            a_slice(endpoint("10.0.0.1"), port=0),
            a_slice(endpoint("10.0.0.1"), port=65536),
            a_slice(endpoint("10.0.0.1"), port="9004"),
            a_slice(endpoint("10.0.0.1"), port=True),
            a_slice(endpoint("10.0.0.1"), port=None),
        ],
    }
    cases["malformed"].append(with_(ports="replica-sync"))
    for reason, objects in cases.items():
        for obj in objects:
            found = ready_addresses(obj, PORT)
            assert (found.addresses, found.skipped) == (frozenset(), (reason,)), obj


def test_a_slice_past_the_api_servers_limit_is_cut_and_counted():
    many = [endpoint(str(ipaddress.IPv4Address(0x0A000001 + i))) for i in range(MAX_ENDPOINTS + 5)]
    found = ready_addresses(a_slice(*many), PORT)
    assert len(found.addresses) == MAX_ENDPOINTS
    assert found.skipped == ("too_many_endpoints",)


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=20,
)


@fuzz_settings(300)
@given(
    path=st.sampled_from(
        [
            ("addressType",),
            ("endpoints",),
            ("endpoints", 0),
            ("endpoints", 0, "addresses"),
            ("endpoints", 0, "addresses", 0),
            ("endpoints", 0, "conditions"),
            ("endpoints", 0, "conditions", "ready"),
            ("ports",),
            ("ports", 1),
            ("ports", 1, "port"),
            ("ports", 1, "name"),
        ]
    ),
    value=JSONISH,
)
def test_any_value_anywhere_never_raises(path: tuple, value: Any):
    obj = copy.deepcopy(a_slice(endpoint("10.0.0.1"), endpoint("10.0.0.2")))
    target = obj
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    found = ready_addresses(obj, PORT)
    family = {"IPv4": 4, "IPv6": 6}.get(str(obj["addressType"]))
    for address in found.addresses:  # whatever is kept is a unicast IP of the slice's family
        assert address.ip.version == family and 0 < address.port < 65536
        assert not (address.ip.is_unspecified or address.ip.is_multicast)
    assert len(found.addresses) <= 2
