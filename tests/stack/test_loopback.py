"""`infergate up` on a machine without the pods' loopback addresses (macOS by default): pods
share 127.0.0.1 with ports of their own unless addresses of their own were asked for, which
stops at once, saying how to add them, before anything starts."""

from __future__ import annotations

import signal

import pytest

from infergw import up
from infergw.api import loopback, pod_ports
from infergw.stack import local


@pytest.fixture
def without_loopback_aliases(monkeypatch):
    # A real bind of an address this machine lacks stands in for macOS's 127.0.0.2.
    lacking = lambda: loopback.missing_loopback("192.0.2.1")  # noqa: E731
    monkeypatch.setattr(local, "missing_loopback", lacking)
    monkeypatch.setattr(pod_ports, "missing_loopback", lacking)


class Spawned(Exception):
    """The first process `up` starts, stopped there: its name and command line."""


def run_up(argv: list[str]) -> int:
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        return up.main(argv)
    finally:
        signal.signal(signal.SIGTERM, sigterm)


def test_many_addresses_asked_for_without_them_says_how_to_add_them(
    tmp_path, monkeypatch, capsys, without_loopback_aliases
) -> None:
    spawned: list[str] = []
    monkeypatch.setattr(
        local.LocalStack, "_spawn", lambda _s, name, *_a, **_k: spawned.append(name)
    )
    status = run_up(["--pods", "1", "--pod-addresses", "many", "--workdir", str(tmp_path)])
    assert status == 1
    err = capsys.readouterr().err
    assert loopback.MACOS_ALIASES in err and "--pod-addresses one" in err
    assert spawned == []


def test_by_default_pods_share_one_address_where_there_is_one(
    tmp_path, monkeypatch, capsys, without_loopback_aliases
) -> None:
    def spawn(_stack, name, cmd, *_a, **_k):
        raise Spawned(name, cmd)

    monkeypatch.setattr(local.LocalStack, "_spawn", spawn)
    with pytest.raises(Spawned) as first:
        run_up(["--pods", "1", "--workdir", str(tmp_path)])
    name, cmd = first.value.args
    assert name == "controllers" and "--pod-addresses=one" in cmd
    assert "pods: one: every pod on 127.0.0.1" in capsys.readouterr().out
