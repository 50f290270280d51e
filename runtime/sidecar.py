"""`infergate runtime`: beside an engine, keep its LoRA adapters as the adapters file says.

Every `--interval` seconds (a level-triggered pass, reconcile.py): read the adapters file
(desired.py), ask the engine what it serves (`GET /v1/models`), unload what is not wanted,
download what is wanted and missing (`infergate download`'s machinery, fetch/download.py, into
the weights cache, linked at `<models dir>/lora/<name>`), load the rest through the engine's
API (engine_api.py), each failure backed off on its own. Nothing restarts the engine.

It serves, on `--host:--port`:
- `GET /ready`: 200 when the engine answers its health check and serves every wanted adapter,
  else 503 — the pod's readiness probe, so a pod missing an adapter leaves the pool. Both
  answer the status below;
- `GET /status`: `{"ready", "reason", "message", "engine", "adapters": [{"name", "state",
  "reason", "message", "failures"}]}`, the first failure's reason and message at the top;
- `GET /health`: 200 while the sidecar runs (its liveness).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web

from infergw.api import logs, tracing, version
from infergw.api import lora_adapters as desired_file
from infergw.api.cli_help import HelpFormatter
from infergw.api.lora_adapters import ENGINE_APIS, UNREADABLE, Adapter, Refused, Unreadable
from infergw.api.names import DOWNLOAD_FAILED, RUNTIME_PORT
from infergw.fetch.cache import Cache, default_root, link
from infergw.fetch.download import DEFAULT_PVC_ROOT, Request, download
from infergw.fetch.evict import hold, release
from infergw.fetch.progress import Progress
from infergw.fetch.source import FetchError
from infergw.fetch.transfer import Retry
from infergw.runtime.engine_api import ENGINE_UNAVAILABLE, EngineApi, EngineRefused
from infergw.runtime.reconcile import (
    FAILED,
    MAX_BACKOFF,
    AdapterStatus,
    State,
    Step,
    decide,
    statuses,
)

log = logging.getLogger("runtime")
DEFAULT_INTERVAL = 1.0
REQUEST_TIMEOUT = 120.0  # seconds for one engine call (a load reads the adapter's weights)
MAX_FILE_BYTES = 1 << 20
DOWNLOAD_RETRIES = 2  # within one download, as `infergate download`'s default
ADAPTERS_MISSING = "AdaptersFileMissing"


@dataclass(slots=True)
class Settings:
    engine: str
    engine_url: str
    adapters_file: Path
    models_dir: str
    served_model_name: str
    cache_dir: Path | None = None
    pvc_root: Path = DEFAULT_PVC_ROOT  # where a pvc://CLAIM adapter is read (standalone mode)
    interval: float = DEFAULT_INTERVAL
    max_backoff: float = MAX_BACKOFF


@dataclass(slots=True)
class Seen:
    """The last pass: what was wanted and refused, what the engine served, and why not all."""

    desired: dict[str, Adapter] = field(default_factory=dict)
    refused: list[Refused] = field(default_factory=list)
    served: set[str] = field(default_factory=set)
    engine_problem: tuple[str, str] | None = (ENGINE_UNAVAILABLE, "not asked yet")
    file_problem: tuple[str, str] | None = None


class Sidecar:
    def __init__(self, settings: Settings, session: aiohttp.ClientSession) -> None:
        self.settings = settings
        self.engine = EngineApi(settings.engine, settings.engine_url, session)
        self.state = State()
        self.seen = Seen()
        self.downloaded: dict[str, str] = {}  # name -> the source its link was made from
        # name -> a shared lock on its weights cache entry while the engine may read it: a
        # cache eviction (fetch/evict.py) never removes a loaded adapter's files
        self.holds: dict[str, int] = {}

    # ---- one pass ------------------------------------------------------------------------

    async def run_once(self) -> None:
        seen = Seen(desired=self.seen.desired, refused=self.seen.refused)
        try:
            seen.desired, seen.refused = self._read_desired()
            base = self.settings.served_model_name
            if base in seen.desired:  # it would never count as loaded, nor be unloaded
                del seen.desired[base]
                seen.refused.append(Refused(base, "the base model's own name"))
        except FileNotFoundError:
            seen.file_problem = (ADAPTERS_MISSING, f"{self.settings.adapters_file} does not exist")
        except (OSError, Unreadable) as exc:
            seen.file_problem = (UNREADABLE, f"{self.settings.adapters_file}: {exc}")
        try:
            await self.engine.health()
            served = await self.engine.models()
        except EngineRefused as exc:
            seen.engine_problem = (exc.reason, exc.message)
            self.state.loaded.clear()  # it may be restarting: what it held is gone then
            self.seen = seen
            return
        seen.engine_problem = None
        # The adapters: what it serves but the base model (whose name no adapter takes).
        listed = served - {self.settings.served_model_name}
        if self.engine.paths.lists_adapters:
            self.state.forget_unserved(listed)
            seen.served = listed
        else:
            seen.served = listed | set(self.state.loaded)
        self.seen = seen
        if seen.file_problem is not None:
            return  # an unreadable file says nothing about what to unload
        # downloaded by this sidecar from this source (a cached entry is linked again at once)
        present = {
            n
            for n, a in seen.desired.items()
            if a.download and self.downloaded.get(n) == a.source and _present(a.path)
        }
        for step in decide(seen.desired, seen.served, present, self.state, time.monotonic()):
            await self._take(step, seen)

    def _read_desired(self) -> tuple[dict[str, Adapter], list[Refused]]:
        with open(self.settings.adapters_file, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
        if len(data) > MAX_FILE_BYTES:
            raise Unreadable(f"larger than {MAX_FILE_BYTES} bytes")
        return desired_file.parse(data.decode(errors="replace"), self.settings.models_dir)

    async def _take(self, step: Step, seen: Seen) -> None:
        # Tracing on: a span per step (its own trace), the adapter's name and what failed.
        span = tracing.start_span(
            "runtime.adapter",
            attributes={"infergate.adapter": step.name, "infergate.step": step.kind},
        )
        reason = ""
        try:
            with tracing.current(span):
                reason = await self._attempt(step, seen)
        finally:
            tracing.end(span, error=reason)

    async def _attempt(self, step: Step, seen: Seen) -> str:
        """Take `step`; the reason it failed, or ""."""
        name = step.name
        attempts = self.state.of(name)
        try:
            if step.kind == "unload":
                await self.engine.unload(name)
                self.state.loaded.pop(name, None)
                release([self.holds.pop(name)] if name in self.holds else [])
                log.info("adapter %s unloaded", name)
            elif step.kind == "download":
                adapter = seen.desired[name]
                entry = await asyncio.to_thread(self._download, adapter)
                self.downloaded[name] = adapter.source
                release([self.holds.pop(name)] if name in self.holds else [])
                if (fd := await asyncio.to_thread(hold, entry)) is not None:
                    self.holds[name] = fd
                log.info("adapter %s downloaded from %s to %s", name, adapter.source, entry)
                await self._load(adapter, seen)
            else:
                await self._load(seen.desired[name], seen)
        except EngineRefused as exc:
            self._failed(name, attempts, exc.reason, exc.message)
            return exc.reason
        except FetchError as exc:
            self._failed(name, attempts, exc.reason, f"{exc}; {exc.hint}")
            return exc.reason
        except (ValueError, OSError) as exc:  # a source download() does not read; a bad link
            self._failed(name, attempts, DOWNLOAD_FAILED, str(exc))
            return DOWNLOAD_FAILED
        self.state.succeeded(name)
        return ""

    async def _load(self, adapter: Adapter, seen: Seen) -> None:
        await self.engine.load(adapter.name, adapter.path)
        self.state.loaded[adapter.name] = adapter
        seen.served.add(adapter.name)
        log.info("adapter %s loaded from %s", adapter.name, adapter.path)

    def _download(self, adapter: Adapter) -> Path:
        req = Request(
            adapter.source, pvc_root=self.settings.pvc_root, retry=Retry(DOWNLOAD_RETRIES)
        )
        cache = Cache(self.settings.cache_dir or default_root())
        entry, _ = download(req, cache, Progress(adapter.source, None))
        link(Path(adapter.path), entry)
        return entry

    def _failed(self, name: str, attempts, reason: str, message: str) -> None:
        attempts.failed(reason, message, time.monotonic(), self.settings.max_backoff)
        log.warning(
            "adapter %s: %s: %s (failure %d, next try in %.0fs)",
            name, reason, message, attempts.failures, attempts.retry_at - time.monotonic(),
        )  # fmt: skip

    # ---- what it reports -----------------------------------------------------------------

    def status(self) -> dict:
        seen = self.seen
        adapters = statuses(seen.desired, seen.served, seen.refused, self.state)
        problem = seen.engine_problem or seen.file_problem or _first_failure(adapters)
        return {
            "ready": problem is None,
            "reason": problem[0] if problem else "AdaptersLoaded",
            "message": problem[1] if problem else f"{len(seen.desired)} adapter(s) loaded",
            "engine": {
                "up": seen.engine_problem is None,
                "message": seen.engine_problem[1] if seen.engine_problem else "serving",
            },
            "adapters": [{k: v for k, v in _as_dict(s).items() if v is not None} for s in adapters],
        }


def _as_dict(s: AdapterStatus) -> dict:
    return {
        "name": s.name,
        "state": s.state,
        "reason": s.reason,
        "message": s.message,
        "failures": s.failures or None,
    }


def _first_failure(adapters: list[AdapterStatus]) -> tuple[str, str] | None:
    """Why not every wanted adapter is loaded: the first failure, else the first pending."""
    for s in adapters:
        if s.state == FAILED:
            return s.reason or FAILED, f"adapter {s.name}: {s.message}"
    pending = [s.name for s in adapters if s.state != "Loaded"]
    if pending:
        return "AdaptersPending", f"not loaded yet: {', '.join(pending)}"
    return None


def _present(path: str) -> bool:
    """A downloaded adapter's link that names a folder."""
    return Path(path).is_dir()


# ---- the server and the command line ---------------------------------------------------------


def routes(sidecar: Sidecar) -> web.Application:
    async def ready(_request: web.Request) -> web.Response:
        status = sidecar.status()
        return web.json_response(status, status=200 if status["ready"] else 503)

    async def status(_request: web.Request) -> web.Response:
        return web.json_response(sidecar.status())

    async def health(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/ready", ready)
    app.router.add_get("/status", status)
    app.router.add_get("/health", health)
    return app


async def reconcile_forever(sidecar: Sidecar) -> None:
    while True:
        try:
            await sidecar.run_once()
        except Exception:  # a bug must not stop the loop: logged, and the next pass tries
            log.exception("reconcile pass failed")
        await asyncio.sleep(sidecar.settings.interval)


async def serve(settings: Settings, host: str, port: int) -> None:
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT, connect=5)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        sidecar = Sidecar(settings, session)
        runner = web.AppRunner(routes(sidecar), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        log.info(
            "runtime: %s at %s, adapters from %s, serving %s:%d",
            settings.engine, settings.engine_url, settings.adapters_file, host, port,
        )  # fmt: skip
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        work = asyncio.create_task(reconcile_forever(sidecar))
        try:
            await stop.wait()
        finally:
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
            await runner.cleanup()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="infergate runtime", description=__doc__.split("\n")[0], formatter_class=HelpFormatter
    )
    engine = p.add_argument_group("Engine")
    adapters = p.add_argument_group("Adapters")
    listening = p.add_argument_group("Listening (/ready, /status)")
    engine.add_argument(
        "--engine", choices=ENGINE_APIS, required=True, help="whose adapter API to call"
    )
    engine.add_argument(
        "--engine-url", required=True, help="the engine, e.g. http://$(POD_IP):8000"
    )
    engine.add_argument("--served-model-name", required=True, help="the base model's name")
    adapters.add_argument("--adapters-file", type=Path, required=True, help="the adapters wanted")
    adapters.add_argument(
        "--models-dir", required=True, help="downloaded adapters are linked at DIR/lora/<name>"
    )
    adapters.add_argument("--cache-dir", type=Path, default=None, help="the weights cache")
    adapters.add_argument(
        "--pvc-root",
        type=Path,
        default=DEFAULT_PVC_ROOT,
        help="where a pvc://CLAIM adapter's claim is, as <root>/CLAIM (default: %(default)s)",
    )
    listening.add_argument("--host", default="127.0.0.1", help="address to listen on")
    listening.add_argument("--port", type=int, default=RUNTIME_PORT, help="port to listen on")
    adapters.add_argument(
        "--interval", type=float, default=DEFAULT_INTERVAL, help="seconds per pass"
    )
    adapters.add_argument(
        "--max-backoff",
        type=float,
        default=MAX_BACKOFF,
        help="seconds at most between two tries of an adapter that keeps failing",
    )
    logs.add_log_flags(p.add_argument_group("Logging"))
    version.add_version_flag(p)
    return p


def main(argv: list[str] | None = None) -> int:
    opts = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    logs.configure(logs.settings_from_args(opts))
    if opts.interval <= 0 or opts.max_backoff <= 0:
        print(
            "infergate runtime: give --interval and --max-backoff in seconds above 0",
            file=sys.stderr,
        )
        return 2
    settings = Settings(
        engine=opts.engine,
        engine_url=opts.engine_url,
        adapters_file=opts.adapters_file,
        models_dir=opts.models_dir,
        served_model_name=opts.served_model_name,
        cache_dir=opts.cache_dir,
        pvc_root=opts.pvc_root,
        interval=opts.interval,
        max_backoff=opts.max_backoff,
    )
    if not tracing.started("runtime"):
        return 2
    try:
        asyncio.run(serve(settings, opts.host, opts.port))
    finally:
        tracing.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
