"""Start the simulator: parse flags, serve HTTP until SIGINT/SIGTERM, then stop cleanly."""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web

from infergw.api import logs, tracing
from infergw.simulator.config import SimulatorConfig, parse_config
from infergw.simulator.server import Simulator

log = logging.getLogger("simulator")


async def _until_stopped(ready: asyncio.Event | None) -> None:
    """Set `ready`, then wait for SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def serve(cfg: SimulatorConfig, ready: asyncio.Event | None = None) -> None:
    if cfg.headless:
        # vLLM's worker node lends its GPUs to the entry's engine; the simulator has none
        log.info("infergate simulator: a headless node, serving nothing until stopped")
        await _until_stopped(ready)
        return
    sim = Simulator(cfg)
    # handler_cancellation: a client that disconnects cancels its handler, which aborts the
    # request in the engine and frees its KV blocks, as vLLM does.
    runner = web.AppRunner(sim.make_app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, cfg.host, cfg.port, reuse_address=True)
    await site.start()
    log.info(
        "infergate simulator serving %r on http://%s:%d (engine metrics: %s, "
        "block size %d, %d KV blocks)",
        cfg.model_name,
        cfg.host,
        cfg.port,
        cfg.engine,
        cfg.block_size,
        cfg.num_gpu_blocks,
    )
    try:
        await _until_stopped(ready)
    finally:
        # As uvicorn does for vLLM: stop listening, let in-flight requests and streams finish
        # (the kubelet's grace period bounds the wait), then stop the engine.
        log.info("shutting down: no new requests, finishing those in flight")
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(argv)
    logs.configure(cfg.log)
    for warning in cfg.warnings:
        log.warning("%s", warning)
    if not tracing.started("simulator"):
        return 2
    try:
        asyncio.run(serve(cfg))
    except OSError as exc:
        log.error(
            "cannot serve on %s:%d: %s (another process on it? choose another --host or --port)",
            cfg.host,
            cfg.port,
            exc,
        )
        return 1
    finally:
        tracing.stop()
    return 0
