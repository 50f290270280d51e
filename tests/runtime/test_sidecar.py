"""The sidecar against fake engines that answer as vLLM and SGLang do: it loads and unloads
through each one's routes, reads /v1/models, takes "already loaded" as loaded, surfaces a
refusal in the engine's words, and is ready only when everything wanted is served."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from infergw.api.lora_adapters import SGLANG_API as SGLANG
from infergw.api.lora_adapters import VLLM_API as VLLM
from infergw.api.lora_adapters import Adapter, document
from infergw.runtime.sidecar import Settings, Sidecar, routes

BASE = "base-model"


class FakeEngine:
    """vLLM's adapter routes (or SGLang's, which list no adapters in /v1/models)."""

    def __init__(self, flavor: str) -> None:
        self.flavor = flavor
        self.loaded: dict[str, str] = {}
        self.refuse: dict[str, tuple[int, str]] = {}  # name -> (status, message)
        self.healthy = True
        self.calls: list[tuple[str, str]] = []

    def app(self) -> web.Application:
        prefix = "/v1" if self.flavor == VLLM else ""
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post(f"{prefix}/load_lora_adapter", self.load)
        app.router.add_post(f"{prefix}/unload_lora_adapter", self.unload)
        return app

    async def health(self, _r):
        return web.Response(status=200 if self.healthy else 503)

    async def models(self, _r):
        names = [BASE] + (sorted(self.loaded) if self.flavor == VLLM else [])
        return web.json_response({"object": "list", "data": [{"id": n} for n in names]})

    def _error(self, status: int, message: str) -> web.Response:
        if self.flavor == SGLANG:
            return web.json_response({"success": False, "error_message": message}, status=status)
        return web.json_response({"error": {"message": message, "code": status}}, status=status)

    async def load(self, r):
        body = await r.json()
        name = body["lora_name"]
        self.calls.append(("load", name))
        if name in self.refuse:
            return self._error(*self.refuse[name])
        if name in self.loaded:
            return self._error(400, f"The lora adapter '{name}' has already been loaded.")
        self.loaded[name] = body["lora_path"]
        if self.flavor == SGLANG:
            return web.json_response({"success": True, "loaded_adapters": self.loaded})
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def unload(self, r):
        name = (await r.json())["lora_name"]
        self.calls.append(("unload", name))
        if self.loaded.pop(name, None) is None:
            return self._error(404, f"The lora adapter '{name}' cannot be found.")
        if self.flavor == SGLANG:
            return web.json_response({"success": True, "loaded_adapters": self.loaded})
        return web.Response(text="Success")


def write(path: Path, *adapters: Adapter) -> None:
    path.write_text(document(list(adapters)))


A = Adapter("a", "file:///adapters/a", "/adapters/a")
B = Adapter("b", "file:///adapters/b", "/adapters/b")


@asynccontextmanager
async def sidecar_for(engine: FakeEngine, tmp_path: Path) -> AsyncIterator[Sidecar]:
    """A sidecar (its passes run by the test) before the fake engine, with a weights cache."""
    async with TestServer(engine.app()) as server, aiohttp.ClientSession() as session:
        settings = Settings(
            engine=engine.flavor,
            engine_url=str(server.make_url("")),
            adapters_file=tmp_path / "adapters.json",
            models_dir=str(tmp_path / "models"),
            served_model_name=BASE,
            cache_dir=tmp_path / "cache",
            interval=0.01,
        )
        yield Sidecar(settings, session)


@pytest.mark.parametrize("flavor", [VLLM, SGLANG])
async def test_adapters_follow_the_file(tmp_path, flavor) -> None:
    engine = FakeEngine(flavor)
    async with sidecar_for(engine, tmp_path) as sidecar:
        await sidecar.run_once()  # no file yet: nothing done, not ready
        assert sidecar.status()["reason"] == "AdaptersFileMissing"
        write(sidecar.settings.adapters_file, A)
        await sidecar.run_once()
        assert engine.loaded == {"a": "/adapters/a"}
        await sidecar.run_once()  # nothing more to do
        assert engine.calls == [("load", "a")]
        assert sidecar.status()["ready"] is True
        write(sidecar.settings.adapters_file, A, B)
        await sidecar.run_once()
        assert set(engine.loaded) == {"a", "b"}
        write(sidecar.settings.adapters_file, B)
        await sidecar.run_once()
        assert set(engine.loaded) == {"b"}
        assert sidecar.status()["ready"] is True
        # the engine restarts (its adapters gone): seen down, then everything loaded again
        engine.healthy, engine.loaded = False, {}
        await sidecar.run_once()
        assert sidecar.status()["reason"] == "EngineUnavailable"
        engine.healthy = True
        await sidecar.run_once()
        assert set(engine.loaded) == {"b"} and sidecar.status()["ready"] is True


async def test_readiness_needs_the_engine_and_every_adapter(tmp_path) -> None:
    engine = FakeEngine(VLLM)
    engine.refuse["b"] = (400, "LoRA rank 64 is greater than max_lora_rank 16.")
    async with sidecar_for(engine, tmp_path) as sidecar:
        write(sidecar.settings.adapters_file, A, B)
        await sidecar.run_once()
        async with TestClient(TestServer(routes(sidecar))) as client:
            ready = await client.get("/ready")
            body = await ready.json()
            assert ready.status == 503 and body["ready"] is False
            assert body["reason"] == "LoadFailed"
            assert "max_lora_rank 16" in body["message"] and "adapter b" in body["message"]
            [a, b] = body["adapters"]
            assert a == {"name": "a", "state": "Loaded"}
            assert b["state"] == "Failed" and b["failures"] == 1
            # backed off: the next pass does not ask again at once
            await sidecar.run_once()
            assert engine.calls.count(("load", "b")) == 1
            # the adapter removed: ready
            write(sidecar.settings.adapters_file, A)
            await sidecar.run_once()
            assert (await client.get("/ready")).status == 200
            engine.healthy = False
            await sidecar.run_once()
            body = await (await client.get("/ready")).json()
            assert body["reason"] == "EngineUnavailable" and "/health" in body["message"]


async def test_an_unreadable_file_unloads_nothing(tmp_path) -> None:
    engine = FakeEngine(VLLM)
    async with sidecar_for(engine, tmp_path) as sidecar:
        write(sidecar.settings.adapters_file, A)
        await sidecar.run_once()
        sidecar.settings.adapters_file.write_text(json.dumps({"adapters": "all"}))
        await sidecar.run_once()
        assert engine.loaded == {"a": "/adapters/a"}
        assert sidecar.status()["reason"] == "AdaptersUnreadable"


async def test_a_missing_download_is_named_and_not_ready(tmp_path) -> None:
    engine = FakeEngine(VLLM)
    models = tmp_path / "models"
    gone = Adapter("gone", "file:///nowhere/gone", f"{models}/lora/gone", download=True)
    async with sidecar_for(engine, tmp_path) as sidecar:
        write(sidecar.settings.adapters_file, gone)
        await sidecar.run_once()
        status = sidecar.status()
        assert not status["ready"] and "gone" in status["message"]
        assert status["adapters"][0]["state"] == "Failed"
        assert engine.calls == []


async def test_a_downloaded_adapter_is_linked_then_loaded(tmp_path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "adapter_config.json").write_text("{}")
    engine = FakeEngine(VLLM)
    models = tmp_path / "models"
    a = Adapter("a", f"file://{source}", f"{models}/lora/a", download=True)
    async with sidecar_for(engine, tmp_path) as sidecar:
        write(sidecar.settings.adapters_file, a)
        await sidecar.run_once()
        assert engine.loaded == {"a": f"{models}/lora/a"}
        assert (models / "lora" / "a" / "adapter_config.json").read_text() == "{}"
        assert sidecar.status()["ready"] is True


async def test_each_step_is_a_span_naming_the_adapter_and_what_failed(tmp_path) -> None:
    """Tracing on (an OTLP receiver this test runs): a span per load or unload, the
    engine's refusal as its error type."""
    from infergw.api import tracing
    from tests.otlp_receiver import HttpReceiver

    engine = FakeEngine(VLLM)
    engine.refuse["b"] = (400, "LoRA rank 64 is greater than max_lora_rank 16.")
    with HttpReceiver() as rx:
        tracing.start("runtime", env={"OTEL_EXPORTER_OTLP_ENDPOINT": rx.endpoint})
        try:
            async with sidecar_for(engine, tmp_path) as sidecar:
                write(sidecar.settings.adapters_file, A, B)
                await sidecar.run_once()
        finally:
            tracing.stop()  # flushes
        spans = rx.spans.wait_for(lambda s: len(s) >= 2, timeout=10)
    steps = {s.attributes["infergate.adapter"]: s for s in spans if s.name == "runtime.adapter"}
    assert steps["a"].attributes["infergate.step"] == "load" and not steps["a"].error
    assert steps["b"].error and steps["b"].attributes["error.type"] == "LoadFailed"


async def test_a_loaded_adapters_entry_survives_a_prune_until_unloaded(tmp_path) -> None:
    """The sidecar holds a loaded adapter's cache entry (fetch/evict.py): a prune in another
    process, long after its last use, leaves it; once unloaded it may go."""
    source = tmp_path / "src"
    source.mkdir()
    (source / "adapter_config.json").write_text("{}")
    engine = FakeEngine(VLLM)
    a = Adapter("a", f"file://{source}", f"{tmp_path / 'models'}/lora/a", download=True)
    cache = tmp_path / "cache"

    async def prune() -> str:
        for use in (cache / ".locks").glob("*.use"):
            os.utime(use, (1, 1))  # last used long ago
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "infergw.fetch.download", "--prune", f"--cache-dir={cache}"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout

    async with sidecar_for(engine, tmp_path) as sidecar:
        write(sidecar.settings.adapters_file, a)
        await sidecar.run_once()
        assert engine.loaded == {"a": a.path}
        assert await prune() == ""
        assert list((cache / "entries").iterdir())
        write(sidecar.settings.adapters_file)
        await sidecar.run_once()
        assert engine.loaded == {}
        assert "removed" in await prune()
        assert list((cache / "entries").iterdir()) == []


class DeepJsonEngine(FakeEngine):
    """Answers a load (500), and the model list once `deep_models` is set, with a 1 MiB
    `[[[…`: JSON nested past any parser's depth."""

    DEEP = "[" * (1 << 20)

    def __init__(self) -> None:
        super().__init__(VLLM)
        self.deep_models = False

    async def load(self, r):
        self.calls.append(("load", (await r.json())["lora_name"]))
        return web.Response(status=500, text=self.DEEP, content_type="application/json")

    async def models(self, r):
        if self.deep_models:
            return web.Response(text=self.DEEP, content_type="application/json")
        return await super().models(r)


async def test_an_engine_answering_json_nested_without_end_is_named_not_a_failed_pass(
    tmp_path,
) -> None:
    """A broken or hostile engine's answer nested past the JSON parser's depth: the load is
    failed in status in the engine's (clipped) words, the model list makes the engine
    unavailable, and no pass raises (a RecursionError escaped the sidecar's handling, so each
    pass died and status never said why)."""
    engine = DeepJsonEngine()
    async with sidecar_for(engine, tmp_path) as sidecar:
        write(sidecar.settings.adapters_file, A)
        await sidecar.run_once()
        status = sidecar.status()
        assert status["reason"] == "LoadFailed" and "answered 500: [[[" in status["message"]
        assert len(status["message"]) < 400  # clipped, not the megabyte
        engine.deep_models = True
        await sidecar.run_once()
        status = sidecar.status()
        assert status["reason"] == "EngineUnavailable"
        assert "not an OpenAI model list" in status["message"]


class HangingEngine(FakeEngine):
    """Takes adapter a's load and never answers it (an engine stuck reading weights)."""

    async def load(self, r):
        if (await r.json())["lora_name"] != "a":
            return await super().load(r)
        self.calls.append(("load", "a"))
        await asyncio.sleep(3600)


async def test_a_load_that_never_answers_is_failed_in_status_saying_so(tmp_path) -> None:
    """The engine call's timeout (120 s in `infergate runtime`; 0.5 s here) ends it: the
    adapter is failed in status saying no answer came in that time (a TimeoutError's text is
    empty: the message said only the URL), backed off, and the other adapters still load."""
    engine = HangingEngine(VLLM)
    async with (
        TestServer(engine.app()) as server,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.5)) as session,
    ):
        settings = Settings(
            engine=VLLM,
            engine_url=str(server.make_url("")),
            adapters_file=tmp_path / "adapters.json",
            models_dir=str(tmp_path / "models"),
            served_model_name=BASE,
        )
        sidecar = Sidecar(settings, session)
        write(settings.adapters_file, A, B)
        await sidecar.run_once()
        status = sidecar.status()
        assert status["reason"] == "EngineUnavailable", status
        assert "load_lora_adapter: no whole answer within 0.5 s" in status["message"]
        a, b = status["adapters"]
        assert a["state"] == "Failed" and a["failures"] == 1
        assert b == {"name": "b", "state": "Loaded"}
        await sidecar.run_once()  # backed off: not asked again at once
        assert engine.calls == [("load", "a"), ("load", "b")]
