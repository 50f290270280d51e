"""`--headless`: the simulator as a worker node of a multi-node engine (vLLM's flag, with its
multi-node flags taken and ignored) serves nothing until it is stopped."""

from __future__ import annotations

import asyncio
import socket

from infergw.simulator.app import serve
from infergw.simulator.config import parse_config
from tests.conftest import free_port


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


async def test_a_headless_node_serves_nothing_until_stopped():
    port = free_port()
    cfg = parse_config(
        ["--port", str(port), "--nnodes=2", "--node-rank=1", "--master-addr=10.0.0.1",
         "--master-port=29501", "--headless"]
    )  # fmt: skip
    assert cfg.headless
    ready = asyncio.Event()
    node = asyncio.create_task(serve(cfg, ready))
    await asyncio.wait_for(ready.wait(), 5)
    await asyncio.sleep(0.1)
    assert not node.done() and not listening(port)
    node.cancel()
    await asyncio.gather(node, return_exceptions=True)


async def test_the_entry_node_serves_as_ever():
    port = free_port()
    cfg = parse_config(["--port", str(port), "--nnodes=2", "--node-rank=0"])
    assert not cfg.headless
    ready = asyncio.Event()
    node = asyncio.create_task(serve(cfg, ready))
    try:
        await asyncio.wait_for(ready.wait(), 10)
        assert listening(port)
    finally:
        node.cancel()
        await asyncio.gather(node, return_exceptions=True)
