"""One-address mode's port map (the pod annotation infergate.io/host-ports) and the choice
between one address and many."""

from __future__ import annotations

import pytest

from infergw.api import loopback, pod_ports
from infergw.api.pod_ports import MANY, ONE, HostPorts, resolve_pod_addresses


def test_a_port_map_reads_back_as_written_and_moves_only_its_ports() -> None:
    ports = HostPorts.parse(" 8000=20417, 5557=20418,")
    assert str(ports) == "5557=20418,8000=20417"
    assert HostPorts.parse(str(ports)) == ports
    assert (ports.of(8000), ports.of(5557), ports.of(5600)) == (20417, 20418, 5600)
    assert HostPorts().of(8000) == 8000 and str(HostPorts()) == ""


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("8000", "is not CONTAINER_PORT=HOST_PORT"),
        ("8000=x", "is not CONTAINER_PORT=HOST_PORT"),
        ("8000=-1", "is not CONTAINER_PORT=HOST_PORT"),
        ("8000=70000", "a port is 1-65535"),
        ("0=20000", "a port is 1-65535"),
        ("8000=20000,8000=20001", "port 8000 is given twice"),
        ("8000=²", "is not CONTAINER_PORT=HOST_PORT"),
    ],
)
def test_a_bad_port_map_says_which_entry(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        HostPorts.parse(text)


def test_auto_takes_many_addresses_where_they_exist_else_one(monkeypatch) -> None:
    assert resolve_pod_addresses("auto") == MANY  # Linux has all of 127.0.0.0/8
    assert resolve_pod_addresses(ONE) == ONE and resolve_pod_addresses(MANY) == MANY
    # A real bind of an address this machine lacks stands in for macOS's 127.0.0.2.
    monkeypatch.setattr(
        pod_ports, "missing_loopback", lambda: loopback.missing_loopback("192.0.2.1")
    )
    assert resolve_pod_addresses("auto") == ONE
    with pytest.raises(ValueError, match="expected one of one, many, auto"):
        resolve_pod_addresses("two")
