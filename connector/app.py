"""Start the sidecar: parse flags, serve until SIGINT/SIGTERM, then stop cleanly."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from infergw.api import logs, tracing
from infergw.api.signals import wait_for_signal
from infergw.connector.allowlist import Allowlist
from infergw.connector.options import ConnectorOptions, parse_options
from infergw.connector.server import ConnectorProxy

log = logging.getLogger("connector")


async def start(
    opts: ConnectorOptions, allowlist: Allowlist | None = None
) -> tuple[web.AppRunner, ConnectorProxy]:
    """Serve on opts.host:opts.port (prefilling only on `allowlist`, by default the one the
    options name); the caller cleans the runner up."""
    proxy = ConnectorProxy(opts, allowlist=allowlist)
    # handler_cancellation: a client that disconnects cancels its handler, which closes the
    # upstream connections of both legs, so the engines abort the request too.
    runner = web.AppRunner(proxy.make_app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, opts.host, opts.port, reuse_address=True).start()
    return runner, proxy


async def serve(opts: ConnectorOptions) -> None:
    runner, _ = await start(opts)
    log.info(
        "infergate connector (%s) on http://%s:%d in front of %s",
        opts.kv_connector,
        opts.host,
        opts.port,
        opts.engine_url,
    )
    try:
        await wait_for_signal()
    finally:
        log.info("shutting down")
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    opts = parse_options(argv)
    logs.configure(logs.settings(opts.log_format, opts.log_level, opts.verbosity))
    if not tracing.started("connector"):
        return 2
    try:
        asyncio.run(serve(opts))
    except OSError as exc:
        log.error(
            "cannot serve on %s:%d: %s (another process on it? choose another --host or --port)",
            opts.host,
            opts.port,
            exc,
        )
        return 1
    finally:
        tracing.stop()
    return 0
