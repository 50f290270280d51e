"""`infergate up` on a machine without the pods' loopback addresses (macOS by default) stops
at once, saying how to add them, before it starts anything."""

from __future__ import annotations

import signal

from infergw import up
from infergw.api import loopback
from infergw.stack import local


def test_up_without_extra_loopback_addresses_says_how_to_add_them(
    tmp_path, monkeypatch, capsys
) -> None:
    # A real bind of an address this machine lacks stands in for macOS's 127.0.0.2.
    monkeypatch.setattr(local, "missing_loopback", lambda: loopback.missing_loopback("192.0.2.1"))
    spawned: list[str] = []
    monkeypatch.setattr(
        local.LocalStack, "_spawn", lambda _s, name, *_a, **_k: spawned.append(name)
    )
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        status = up.main(["--pods", "1", "--workdir", str(tmp_path)])
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    assert status == 1
    assert loopback.MACOS_ALIASES in capsys.readouterr().err
    assert spawned == []
