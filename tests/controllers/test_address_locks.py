"""Two standalone runtimes on one machine never give their pods the same loopback address,
even while a pod's engine is still loading and has bound no port yet (a second runtime used
to see the ports free, take the address, and answer the first pod's readiness probe)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from infergw.api.lifetime import spawn
from infergw.controllers.address_locks import AddressLocks
from infergw.controllers.local_runtime import LocalRuntime
from infergw.controllers.memory_store import MemoryStore
from tests.waiting import wait_for


def test_an_address_is_one_claimants_until_released(tmp_path) -> None:
    first, second = AddressLocks(tmp_path), AddressLocks(tmp_path)
    assert first.claim("127.0.0.2") and first.claim("127.0.0.2")  # again: still its own
    assert not second.claim("127.0.0.2")
    assert second.claim("127.0.0.3")
    first.release("127.0.0.2")
    assert second.claim("127.0.0.2")
    second.release_all()
    assert first.claim("127.0.0.3")


def test_a_dead_claimants_addresses_are_free_again(tmp_path) -> None:
    """The kernel drops a killed process's lock: a crashed runtime leaves no claim."""
    holder = spawn(
        [
            sys.executable,
            "-c",
            "import pathlib, sys, time\n"
            "from infergw.controllers.address_locks import AddressLocks\n"
            "assert AddressLocks(pathlib.Path(sys.argv[1])).claim('127.0.0.9'); "
            "print('held', flush=True); time.sleep(60)",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        locks = AddressLocks(tmp_path)
        assert not locks.claim("127.0.0.9")
        holder.kill()
        holder.wait()
        wait_for(lambda: locks.claim("127.0.0.9"), "the dead holder's lock to go", within=5)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_two_runtimes_take_different_addresses_for_ports_nobody_bound_yet(tmp_path) -> None:
    runtimes = [
        LocalRuntime(MemoryStore(), tmp_path / name, address_locks=AddressLocks(tmp_path / "ips"))
        for name in ("a", "b")
    ]
    # Nothing listens yet (an engine loading its model): the ports are free everywhere.
    a, b = (rt._take_ip([8000, 5600]) for rt in runtimes)
    assert a != b, (a, b)
    assert a.startswith("127.0.0.") and b.startswith("127.0.0.")


def test_without_extra_loopback_addresses_the_runtime_says_how_to_add_them(
    tmp_path, monkeypatch
) -> None:
    """macOS has 127.0.0.1 alone: every address the runtime tries is missing (a real bind of an
    address this machine lacks stands in), and it stops with the fix instead of trying 253."""
    from infergw.api import loopback
    from infergw.controllers import local_runtime

    monkeypatch.setattr(
        local_runtime, "missing_loopback", lambda _ip: loopback.missing_loopback("192.0.2.1")
    )
    locks = AddressLocks(tmp_path / "ips")
    runtime = LocalRuntime(MemoryStore(), tmp_path / "a", address_locks=locks)
    with pytest.raises(RuntimeError, match="sudo ifconfig lo0 alias"):
        runtime._take_ip([8000])
    assert AddressLocks(tmp_path / "ips").claim("127.0.0.2")  # the claim was released
