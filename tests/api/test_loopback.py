"""The pods' own loopback addresses: present on Linux, missing on macOS without aliases (an
address this machine lacks stands in for 127.0.0.2 there, with a real bind)."""

from __future__ import annotations

from infergw.api.loopback import MACOS_ALIASES, missing_loopback

ABSENT = "192.0.2.1"  # TEST-NET-1: on no interface of this machine, as 127.0.0.2 on macOS


def test_linux_has_the_pods_loopback_addresses() -> None:
    assert missing_loopback() is None
    assert missing_loopback("127.0.0.254") is None


def test_a_missing_address_says_how_to_add_the_aliases() -> None:
    problem = missing_loopback(ABSENT)
    assert problem is not None
    assert ABSENT in problem and MACOS_ALIASES in problem
