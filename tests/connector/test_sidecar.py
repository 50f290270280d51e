"""The decode pod's connector sidecar (`connector/`) against real HTTP servers.

The prefill and decode peers are recording fake engines (aiohttp servers on free ports standing in
for vLLM) or real simulator processes; the sidecar under test is always the real server, spoken to
over HTTP.
"""

from __future__ import annotations

import ast
import asyncio
import io
import json
import logging
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
import openai
import pytest
import requests
import yaml
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict

from infergw.api import logs
from infergw.api.lifetime import spawn
from infergw.api.names import BOTH, POOL_FILE_ENV, PREFILLER_HEADER, ROLE_LABEL
from infergw.cli import main as infergate_main
from infergw.cluster.pool import ACTIVE_PORTS_ANNOTATION
from infergw.connector.app import start as start_connector_app
from infergw.connector.http_kv import prefill_body as http_prefill_body
from infergw.connector.options import ConnectorOptions, parse_options
from infergw.connector.server import ConnectorProxy, parse_prefillers
from infergw.stack.readiness import wait_http
from tests.conftest import free_port, running
from tests.fuzzing import examples, fuzz_settings
from tests.kubeapi import KubeAPIEmulator
from tests.paths import ROOT, TINY_MODEL

PREFILL_KV_REQUEST = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}
# What vLLM's NixlConnector answers a length-capped prefill with.
PREFILL_KV_REPLY = {
    "do_remote_prefill": True,
    "do_remote_decode": False,
    "remote_block_ids": [1, 2, 3],
    "remote_engine_id": "engine-prefill-0",
    "remote_request_id": "cmpl-abc",
    "remote_host": "10.0.0.7",
    "remote_port": 5600,
    "tp_size": 1,
}
CHAT = {
    "model": "tiny",
    "messages": [{"role": "user", "content": "hello there"}],
    "max_tokens": 50,
    "max_completion_tokens": 50,
    "temperature": 0.2,
    "stream": True,
    "stream_options": {"include_usage": True},
}
COMPLETION = {"model": "tiny", "prompt": "once upon a time", "max_tokens": 20, "min_tokens": 5}

# ---- the fake engine ----------------------------------------------------------------------


@dataclass
class Seen:
    method: str
    path_qs: str
    headers: CIMultiDict[str]
    raw: bytes
    body: dict | None


Custom = Callable[[web.Request, "dict | None"], Awaitable[web.StreamResponse | None]]


class FakeEngine:
    """An aiohttp server answering like vLLM's OpenAI routes, recording every request."""

    def __init__(
        self,
        name: str,
        *,
        status: int = 200,
        kv_reply: dict | None = None,
        custom: Custom | None = None,
    ) -> None:
        self.name = name
        self.status = status
        self.kv_reply = kv_reply
        self.custom = custom
        self.seen: list[Seen] = []
        self.arrived = asyncio.Event()
        self.gone = asyncio.Event()  # a handler's client (the sidecar) closed the connection
        self.port = free_port()
        self.runner: web.AppRunner | None = None

    @property
    def host_port(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host_port}"

    async def start(self) -> FakeEngine:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self.runner:
            await self.runner.cleanup()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        self.seen.append(
            Seen(request.method, request.path_qs, CIMultiDict(request.headers), raw, body)
        )
        self.arrived.set()
        try:
            if self.custom is not None:
                out = await self.custom(request, body)
                if out is not None:
                    return out
            if self.status != 200:
                return web.json_response(
                    {"error": {"message": f"{self.name} says {self.status}", "code": self.status}},
                    status=self.status,
                )
            if request.method == "GET":
                return web.json_response({"object": "list", "data": [], "from": self.name})
            if body and body.get("stream"):
                return await self._stream(request, ["Hel", "lo", "!"])
            doc = {
                "id": f"cmpl-{self.name}",
                "object": "chat.completion",
                "choices": [{"index": 0, "message": {"content": f"from {self.name}"}}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
            }
            kv = (body or {}).get("kv_transfer_params") or {}
            if self.kv_reply is not None and kv.get("do_remote_decode"):
                doc["kv_transfer_params"] = self.kv_reply
            return web.json_response(doc, headers={"X-Engine": self.name})
        except (asyncio.CancelledError, ConnectionError):
            self.gone.set()
            raise

    async def _stream(self, request: web.Request, parts: list[str]) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for p in parts:
            await resp.write(sse({"choices": [{"delta": {"content": p}}]}))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


def sse(doc: dict) -> bytes:
    return f"data: {json.dumps(doc)}\n\n".encode()


def sse_text(raw: bytes) -> str:
    out = []
    for line in raw.decode().splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            delta = json.loads(line[6:])["choices"][0]["delta"]
            out.append(delta.get("content", ""))
    return "".join(out)


@pytest.fixture
async def engines():
    started: list[FakeEngine] = []

    async def make(name: str, **kw) -> FakeEngine:
        e = await FakeEngine(name, **kw).start()
        started.append(e)
        return e

    yield make
    for e in started:
        await e.stop()


class LoopbackPrefillers:
    """The allowlist of the tests of the legs themselves: any 127.0.0.1 port (their fake
    prefillers, and ports nobody listens on). The pool allowlist is tested on its own below,
    with real pool files and the Kubernetes API emulator."""

    synced = True

    def allows(self, host_port: str) -> bool:
        return host_port.startswith("127.0.0.1:")

    def refusal(self, host_port: str) -> str:
        return f"{host_port} is not on 127.0.0.1"

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass


@pytest.fixture
async def sidecar():
    """Start the real sidecar server in this process: sidecar(engine_url, **opts) -> base URL.
    allowlist=None: the one the options name (pool_name, pool_file)."""
    runners: list[web.AppRunner] = []
    proxies: list[ConnectorProxy] = []

    async def start(engine_url: str, allowlist=LoopbackPrefillers(), **kw) -> str:
        opts = dict(
            connect_timeout=2.0,
            prefill_timeout=5.0,
            decode_timeout=10.0,
            retry_backoff=0.01,
        )
        opts.update(kw)
        o = ConnectorOptions(host="127.0.0.1", port=free_port(), engine_url=engine_url, **opts)
        runner, proxy = await start_connector_app(o, allowlist)
        runners.append(runner)
        proxies.append(proxy)
        return f"http://127.0.0.1:{o.port}"

    start.proxies = proxies  # type: ignore[attr-defined]
    start.runners = runners  # type: ignore[attr-defined]
    yield start
    for r in runners:
        await r.cleanup()


@pytest.fixture
async def client():
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as s:
        yield s


def pd(prefillers: str, **extra: str) -> dict[str, str]:
    return {"x-prefiller-host-port": prefillers, **extra}


def dead_host_port() -> str:
    """An address nobody listens on: connections are refused."""
    return f"127.0.0.1:{free_port()}"


# ---- flags and header parsing ---------------------------------------------------------------


def test_options_defaults_and_aliases():
    o = parse_options(["--port", "8100"])
    assert (o.host, o.port, o.kv_connector, o.engine_url) == (
        "127.0.0.1",
        8100,
        "nixl",
        "http://127.0.0.1:8200",
    )
    assert o.sglang_bootstrap_port == 8998
    assert parse_options(["--kv-connector", "nixlv2"]).kv_connector == "nixl"
    o = parse_options(
        [
            "--engine-url",
            "http://10.0.0.1:9000/",
            "--kv-connector",
            "sglang",
            "--prefill-retries",
            "0",
        ]
    )
    assert (o.engine_url, o.kv_connector, o.prefill_retries) == (
        "http://10.0.0.1:9000",
        "sglang",
        0,
    )
    with pytest.raises(SystemExit):
        parse_options(["--kv-connector", "carrier-pigeon"])
    with pytest.raises(SystemExit):
        parse_options(["--prefill-timeout", "0"])


def test_infergate_cli_has_connector(capsys):
    with pytest.raises(SystemExit) as exc:
        infergate_main(["connector", "--help"])
    assert exc.value.code == 0
    assert "--kv-connector" in capsys.readouterr().out
    infergate_main(["--help"])
    assert "connector" in capsys.readouterr().out


def test_python_m_connector_is_its_command():
    """The sidecar is its own top-level package: `python -m infergw.connector` starts it (the
    image and the distribution ship the folder: tests/test_image_packages.py)."""
    done = subprocess.run(
        [sys.executable, "-m", "infergw.connector", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert "--kv-connector" in done.stdout


def test_the_picker_and_the_sidecar_share_one_spelling_of_their_names():
    """The role label and the prefiller header are assigned once, in api.names;
    the picker's P/D plugins, its protocol and the sidecar import them from there."""
    shared = {ROLE_LABEL, PREFILLER_HEADER, BOTH}
    copies = []
    for path in [*(ROOT / "epp").rglob("*.py"), *(ROOT / "connector").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Assign)
                and isinstance(node.value, ast.Constant)
                and node.value.value in shared
            ):
                copies.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert copies == []


def test_parse_prefillers():
    assert parse_prefillers("10.0.0.1:8000") == ["10.0.0.1:8000"]
    assert parse_prefillers(" 10.0.0.1:8000 , 10.0.0.2:8001,") == ["10.0.0.1:8000", "10.0.0.2:8001"]
    assert parse_prefillers("[fd00::1]:8000,pod-a.ns:9") == ["[fd00::1]:8000", "pod-a.ns:9"]
    for bad in ("10.0.0.1", "10.0.0.1:0", "10.0.0.1:x", ":80", "a/b:80", "u@h:80", "[::1:80", ","):
        with pytest.raises(ValueError):
            parse_prefillers(bad)


# ---- passthrough -----------------------------------------------------------------------------


async def test_passthrough_is_unchanged(engines, sidecar, client):
    engine = await engines("decode")
    url = await sidecar(engine.url)
    raw = b'{"model": "tiny",  "prompt": "spaces  kept", "max_tokens": 3}'
    async with client.post(
        url + "/v1/completions?trace=1",
        data=raw,
        headers={
            "Content-Type": "application/json",
            "Authorization": "Bearer k",
            "X-Request-Id": "client-id-1",
            "X-Custom": "yes",
            "Connection": "keep-alive, X-Hop",
            "X-Hop": "only for the next hop",
            "Keep-Alive": "timeout=5",
        },
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
    ) as resp:
        assert resp.status == 200
        assert resp.headers["X-Engine"] == "decode"
        assert (await resp.json())["choices"][0]["message"]["content"] == "from decode"
    (seen,) = engine.seen
    assert (seen.method, seen.path_qs) == ("POST", "/v1/completions?trace=1")
    assert seen.raw == raw  # byte for byte: the body is not re-encoded
    for name, value in {
        "Content-Type": "application/json",
        "Authorization": "Bearer k",
        "X-Request-Id": "client-id-1",
        "X-Custom": "yes",
    }.items():
        assert seen.headers[name] == value
    assert "X-Hop" not in seen.headers and "Keep-Alive" not in seen.headers
    assert seen.headers.get("Connection", "keep-alive").lower() == "keep-alive"
    for name in ("User-Agent", "Accept", "Accept-Encoding"):  # the sidecar adds none of its own
        assert name not in seen.headers


async def test_passthrough_keeps_status_errors_and_other_paths(engines, sidecar, client):
    engine = await engines("decode", status=404)
    url = await sidecar(engine.url)
    async with client.post(url + "/v1/chat/completions", json={"model": "nope"}) as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["message"] == "decode says 404"
    # A prefiller header on a path outside completions: proxied as is, no prefill leg.
    prefill = await engines("prefill")
    engine.status = 200
    async with client.get(url + "/v1/models", headers=pd(prefill.host_port)) as resp:
        assert resp.status == 200
        assert (await resp.json())["from"] == "decode"
    async with client.post(url + "/tokenize", json={"x": 1}, headers=pd(prefill.host_port)) as r:
        assert r.status == 200
    assert prefill.seen == []
    assert engine.seen[-1].headers["x-prefiller-host-port"] == prefill.host_port


async def test_engine_down_is_a_clear_502(sidecar, client):
    url = await sidecar("http://" + dead_host_port())
    async with client.post(url + "/v1/completions", json=COMPLETION) as resp:
        assert resp.status == 502
        err = (await resp.json())["error"]
    assert err["code"] == 502 and err["type"] == "BadGateway"
    assert "local engine" in err["message"] and "connection failed" in err["message"]


async def _gated_stream(gate: asyncio.Event, record: dict) -> Custom:
    async def custom(request: web.Request, body: dict | None) -> web.StreamResponse | None:
        if not (body and body.get("stream")):
            return None
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(sse({"choices": [{"delta": {"content": "first"}}]}))
        try:
            await asyncio.wait_for(gate.wait(), 5)
            record["client_saw_first_chunk_early"] = True
        except TimeoutError:
            record["client_saw_first_chunk_early"] = False
        await resp.write(sse({"choices": [{"delta": {"content": " second"}}]}))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    return custom


@pytest.mark.parametrize("mode", ["passthrough", "nixl"])
async def test_streaming_is_not_buffered(engines, sidecar, client, mode):
    """The engine holds its second chunk until the client has seen the first one, through the
    sidecar: a buffering proxy would leave it waiting until the 5 s gate times out."""
    gate, record = asyncio.Event(), {}
    decode = await engines("decode", custom=await _gated_stream(gate, record))
    prefill = await engines("prefill", kv_reply=PREFILL_KV_REPLY)
    url = await sidecar(decode.url, kv_connector="nixl")
    headers = pd(prefill.host_port) if mode == "nixl" else {}
    t0 = time.monotonic()
    got = b""
    async with client.post(url + "/v1/chat/completions", json=CHAT, headers=headers) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream"
        while True:
            chunk = await resp.content.readany()
            if not chunk:
                break
            got += chunk
            if b"first" in got:
                gate.set()
    assert record["client_saw_first_chunk_early"] is True
    assert time.monotonic() - t0 < 4
    assert sse_text(got) == "first second"


# ---- nixl and mooncake --------------------------------------------------------------------


@pytest.mark.parametrize("connector", ["nixl", "mooncake"])
async def test_nixl_legs(engines, sidecar, client, connector):
    prefill = await engines("prefill", kv_reply=PREFILL_KV_REPLY)
    decode = await engines("decode")
    url = await sidecar(decode.url, kv_connector=connector)
    async with client.post(
        url + "/v1/chat/completions",
        json=CHAT,
        headers=pd(prefill.host_port, Authorization="Bearer k", **{"X-Request-Id": "client-1"}),
    ) as resp:
        assert resp.status == 200
        assert sse_text(await resp.read()) == "Hello!"

    (p,) = prefill.seen
    assert p.path_qs == "/v1/chat/completions"
    expected_prefill = {k: v for k, v in CHAT.items() if k != "stream_options"}
    expected_prefill.update(
        stream=False,
        max_tokens=1,
        max_completion_tokens=1,
        min_tokens=1,
        kv_transfer_params=PREFILL_KV_REQUEST,
    )
    assert p.body == expected_prefill

    (d,) = decode.seen
    assert d.path_qs == "/v1/chat/completions"
    assert d.body == {**CHAT, "kv_transfer_params": PREFILL_KV_REPLY}

    # One fresh request id on both legs, never the client's; the routing header stays here.
    rid = p.headers["x-request-id"]
    assert uuid.UUID(rid) and rid != "client-1"
    assert d.headers.getall("x-request-id") == [rid] and p.headers.getall("x-request-id") == [rid]
    for leg in (p, d):
        assert "x-prefiller-host-port" not in leg.headers
        assert leg.headers["Authorization"] == "Bearer k"
        assert leg.headers["Content-Type"] == "application/json"


async def test_nixl_non_streaming_completion(engines, sidecar, client):
    prefill = await engines("prefill", kv_reply=PREFILL_KV_REPLY)
    decode = await engines("decode")
    url = await sidecar(decode.url)
    async with client.post(
        url + "/v1/completions", json=COMPLETION, headers=pd(prefill.host_port)
    ) as resp:
        assert resp.status == 200
        assert resp.headers["X-Engine"] == "decode"
        assert (await resp.json())["id"] == "cmpl-decode"
    assert prefill.seen[0].body["min_tokens"] == 1 and prefill.seen[0].body["stream"] is False
    assert decode.seen[0].body == {**COMPLETION, "kv_transfer_params": PREFILL_KV_REPLY}


async def test_nixl_prefill_without_params_is_a_clear_error(engines, sidecar, client):
    prefill = await engines("prefill")  # answers 200 with no kv_transfer_params
    decode = await engines("decode")
    url = await sidecar(decode.url)
    async with client.post(
        url + "/v1/completions", json=COMPLETION, headers=pd(prefill.host_port)
    ) as r:
        assert r.status == 502
        err = (await r.json())["error"]
    assert prefill.host_port in err["message"] and "kv_transfer_params" in err["message"]
    assert err["type"] == "BadGateway"
    assert decode.seen == []


async def test_prefill_rejecting_the_request_keeps_its_4xx(engines, sidecar, client):
    prefill = await engines("prefill", status=400)
    decode = await engines("decode")
    url = await sidecar(decode.url)
    async with client.post(
        url + "/v1/completions", json=COMPLETION, headers=pd(prefill.host_port)
    ) as r:
        assert r.status == 400
        err = (await r.json())["error"]
    assert prefill.host_port in err["message"] and "prefill says 400" in err["message"]
    assert len(prefill.seen) == 1 and decode.seen == []  # a 4xx is not retried


async def test_bad_header_and_bad_body_are_400(engines, sidecar, client):
    decode = await engines("decode")
    url = await sidecar(decode.url)
    async with client.post(url + "/v1/completions", json=COMPLETION, headers=pd("nohost")) as r:
        assert r.status == 400
        assert "x-prefiller-host-port" in (await r.json())["error"]["message"]
    async with client.post(
        url + "/v1/completions", data=b"{not json", headers=pd("127.0.0.1:9")
    ) as r:
        assert r.status == 400
        assert "not valid JSON" in (await r.json())["error"]["message"]
    assert decode.seen == []


# ---- http and lmcache -------------------------------------------------------------------------


def test_http_prefill_body_clamps_min_tokens():
    assert http_prefill_body({"max_tokens": 9, "min_tokens": 0})["min_tokens"] == 0
    assert "min_tokens" not in http_prefill_body({"prompt": "x"})


@pytest.mark.parametrize("connector", ["http", "lmcache"])
async def test_http_legs(engines, sidecar, client, connector):
    prefill = await engines("prefill", kv_reply=PREFILL_KV_REPLY)
    decode = await engines("decode")
    url = await sidecar(decode.url, kv_connector=connector)
    body = {**COMPLETION, "stream": True, "stream_options": {"include_usage": True}}
    async with client.post(url + "/v1/completions", json=body, headers=pd(prefill.host_port)) as r:
        assert r.status == 200
        assert sse_text(await r.read()) == "Hello!"
    (p,) = prefill.seen
    assert p.body == {**COMPLETION, "max_tokens": 1, "max_completion_tokens": 1, "min_tokens": 1}
    assert "kv_transfer_params" not in p.body and "stream" not in p.body
    (d,) = decode.seen
    assert d.body == body  # the client's request as sent
    assert d.headers["x-request-id"] == p.headers["x-request-id"]


# ---- sglang ------------------------------------------------------------------------------------


async def test_sglang_legs_run_concurrently_with_one_room(engines, sidecar, client):
    """Each fake answers only once the other leg has arrived: sequential legs would deadlock
    until the 3 s wait gives up and answers 500."""
    peers: dict[str, FakeEngine] = {}

    def waits_for(other: str) -> Custom:
        async def custom(request, body):
            try:
                await asyncio.wait_for(peers[other].arrived.wait(), 3)
            except TimeoutError:
                return web.json_response({"error": {"message": f"no {other} leg"}}, status=500)
            return None

        return custom

    peers["prefill"] = await engines("prefill", custom=waits_for("decode"))
    peers["decode"] = await engines("decode", custom=waits_for("prefill"))
    url = await sidecar(peers["decode"].url, kv_connector="sglang", sglang_bootstrap_port=8998)
    t0 = time.monotonic()
    async with client.post(
        url + "/v1/chat/completions", json=CHAT, headers=pd(peers["prefill"].host_port)
    ) as r:
        assert r.status == 200
        assert sse_text(await r.read()) == "Hello!"
    assert time.monotonic() - t0 < 2.5
    (p,) = peers["prefill"].seen
    (d,) = peers["decode"].seen
    room = d.body["bootstrap_room"]
    assert isinstance(room, int) and 0 <= room < 2**63
    fields = {"bootstrap_host": "127.0.0.1", "bootstrap_port": 8998, "bootstrap_room": room}
    assert d.body == {**CHAT, **fields}
    expected_prefill = {k: v for k, v in CHAT.items() if k != "stream_options"}
    assert p.body == {**expected_prefill, **fields, "stream": False}
    assert p.headers["x-request-id"] == d.headers["x-request-id"]


async def test_sglang_retries_the_pair_on_the_next_prefiller(engines, sidecar, client):
    busy = await engines("busy", status=503)
    prefill = await engines("prefill")
    decode = await engines("decode")
    url = await sidecar(decode.url, kv_connector="sglang")
    header = pd(f"{busy.host_port},{prefill.host_port}")
    async with client.post(url + "/v1/completions", json=COMPLETION, headers=header) as r:
        assert r.status == 200
        assert (await r.json())["id"] == "cmpl-decode"
    assert len(busy.seen) == 1 and len(prefill.seen) == 1
    good_room = prefill.seen[0].body["bootstrap_room"]
    assert good_room != busy.seen[0].body["bootstrap_room"]  # a new room for the new pair
    # The decode leg of the abandoned pair may or may not have landed; the one relayed did,
    # and it shares the successful prefill's room.
    assert decode.seen[-1].body["bootstrap_room"] == good_room


async def test_sglang_decode_error_is_relayed_and_prefill_dropped(engines, sidecar, client):
    async def hang(request, body):
        await asyncio.sleep(30)

    prefill = await engines("prefill", custom=hang)
    decode = await engines("decode", status=400)
    url = await sidecar(decode.url, kv_connector="sglang")
    async with client.post(
        url + "/v1/completions", json=COMPLETION, headers=pd(prefill.host_port)
    ) as r:
        assert r.status == 400
        assert (await r.json())["error"]["message"] == "decode says 400"
    await asyncio.wait_for(prefill.gone.wait(), 3)  # its connection was closed, not left hanging


# ---- retries and failures -------------------------------------------------------------------


async def test_retry_on_503_moves_to_next_prefiller(engines, sidecar, client):
    busy = await engines("busy", status=503)
    prefill = await engines("prefill", kv_reply=PREFILL_KV_REPLY)
    decode = await engines("decode")
    url = await sidecar(decode.url)
    header = pd(f"{busy.host_port},{prefill.host_port}")
    async with client.post(url + "/v1/completions", json=COMPLETION, headers=header) as r:
        assert r.status == 200
    assert len(busy.seen) == 1 and len(prefill.seen) == 1
    assert busy.seen[0].body == prefill.seen[0].body
    assert decode.seen[0].body["kv_transfer_params"] == PREFILL_KV_REPLY
    async with client.get(url + "/connector/metrics") as r:
        text = await r.text()
    assert (
        'infergate_connector_prefill_failures_total{connector="nixl",reason="status_503"} 1.0'
        in text
    )
    assert 'infergate_connector_requests_total{connector="nixl",mode="disaggregated"} 1.0' in text
    assert 'infergate_connector_prefill_duration_seconds_count{connector="nixl"} 1.0' in text


async def test_retry_on_refused_connection(engines, sidecar, client):
    prefill = await engines("prefill", kv_reply=PREFILL_KV_REPLY)
    decode = await engines("decode")
    url = await sidecar(decode.url)
    header = pd(f"{dead_host_port()},{prefill.host_port}")
    async with client.post(url + "/v1/completions", json=COMPLETION, headers=header) as r:
        assert r.status == 200
    assert len(prefill.seen) == 1 and len(decode.seen) == 1


async def test_all_prefillers_failing_is_a_quick_clear_error(engines, sidecar, client):
    busy = await engines("busy", status=503)
    decode = await engines("decode")
    url = await sidecar(decode.url, prefill_retries=2, local_prefill_fallback=False)
    dead = dead_host_port()
    t0 = time.monotonic()
    async with client.post(
        url + "/v1/completions", json=COMPLETION, headers=pd(f"{dead},{busy.host_port}")
    ) as r:
        assert r.status == 502
        err = (await r.json())["error"]
    assert time.monotonic() - t0 < 2
    assert err["code"] == 502 and err["param"] is None
    msg = err["message"]
    assert "after 3 attempts" in msg
    assert f"{dead} connection failed" in msg and f"{busy.host_port} answered 503" in msg
    # dead, busy, busy again: a prefiller that refused the connection is not asked again
    assert msg.count(f"{dead} connection failed") == 1
    assert len(busy.seen) == 2 and decode.seen == []

    # Every prefiller saying 503: the client hears 503.
    busy2 = await engines("busy2", status=503)
    async with client.post(
        url + "/v1/completions",
        json=COMPLETION,
        headers=pd(f"{busy.host_port},{busy2.host_port}"),
    ) as r:
        assert r.status == 503
        assert (await r.json())["error"]["type"] == "ServiceUnavailable"


async def test_prefill_timeout_is_a_failure_not_a_hang(engines, sidecar, client):
    """--prefill-timeout bounds the whole leg, retries included: a leg whose first prefiller
    hangs until the timeout has no time left for another, so it never asks the next one."""
    slow = await engines("slow", custom=_hang)
    second = await engines("second", custom=_hang)
    decode = await engines("decode")
    url = await sidecar(decode.url, prefill_timeout=0.3, prefill_retries=3)
    t0 = time.monotonic()
    async with client.post(
        url + "/v1/completions", json=COMPLETION, headers=pd(f"{slow.host_port},{second.host_port}")
    ) as r:
        assert r.status == 502
        msg = (await r.json())["error"]["message"]
    assert f"{slow.host_port} did not answer within the leg's 0.3s (--prefill-timeout)" in msg
    assert "after 1 attempt " in msg
    assert time.monotonic() - t0 < 2  # not 4 attempts of 0.3 s each, nor a hang
    assert len(slow.seen) == 1 and second.seen == [] and decode.seen == []
    await asyncio.wait_for(slow.gone.wait(), 3)


async def test_a_prefiller_that_answers_after_a_refusal_elsewhere_serves(engines, sidecar, client):
    """Skipping a refusing prefiller leaves the retries to the others of the header."""
    flaky_calls = 0

    async def busy_once(request, body):
        nonlocal flaky_calls
        flaky_calls += 1
        if flaky_calls == 1:
            return web.json_response({"error": {"message": "busy"}}, status=503)
        return None  # then an answer with the KV reply

    flaky = await engines("flaky", custom=busy_once, kv_reply=PREFILL_KV_REPLY)
    decode = await engines("decode")
    url = await sidecar(decode.url, prefill_retries=2)
    header = pd(f"{dead_host_port()},{flaky.host_port}")
    async with client.post(url + "/v1/completions", json=COMPLETION, headers=header) as r:
        assert r.status == 200
    # dead (refused), flaky (503), then flaky again, not the dead one
    assert len(flaky.seen) == 2
    assert decode.seen[0].body["kv_transfer_params"] == PREFILL_KV_REPLY


# ---- client disconnects ---------------------------------------------------------------------


async def _endless(request: web.Request, body: dict | None) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    for i in range(400):
        await resp.write(sse({"choices": [{"delta": {"content": f"t{i} "}}]}))
        await asyncio.sleep(0.05)
    await resp.write_eof()
    return resp


@pytest.mark.parametrize("mode", ["passthrough", "nixl", "sglang"])
async def test_client_disconnect_closes_the_decode_upstream(engines, sidecar, client, mode):
    decode = await engines("decode", custom=_endless)
    prefill = await engines("prefill", kv_reply=PREFILL_KV_REPLY)
    url = await sidecar(decode.url, kv_connector="sglang" if mode == "sglang" else "nixl")
    headers = {} if mode == "passthrough" else pd(prefill.host_port)
    resp = await client.post(url + "/v1/chat/completions", json=CHAT, headers=headers)
    assert resp.status == 200
    assert b"t0" in await resp.content.readany()
    assert not decode.gone.is_set()
    resp.close()  # the client goes away mid-stream
    await asyncio.wait_for(decode.gone.wait(), 3)


async def test_client_disconnect_during_prefill_cancels_it(engines, sidecar, client):
    async def hang(request, body):
        await asyncio.sleep(30)

    prefill = await engines("prefill", custom=hang)
    decode = await engines("decode")
    url = await sidecar(decode.url)
    task = asyncio.create_task(
        client.post(url + "/v1/completions", json=COMPLETION, headers=pd(prefill.host_port))
    )
    await asyncio.wait_for(prefill.arrived.wait(), 3)
    task.cancel()  # closes the client's connection to the sidecar
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(prefill.gone.wait(), 3)
    await asyncio.sleep(0.1)
    assert decode.seen == []


async def test_engine_breaking_mid_stream_truncates_the_client_response(engines, sidecar, client):
    async def breaks(request, body):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(sse({"choices": [{"delta": {"content": "partial"}}]}))
        await asyncio.sleep(0.1)
        request.transport.close()  # dies without the terminating chunk
        return resp

    decode = await engines("decode", custom=breaks)
    url = await sidecar(decode.url)
    async with client.post(url + "/v1/chat/completions", json=CHAT) as r:
        assert r.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.read()


# ---- with real simulators (slow) -------------------------------------------------------------

SIM_FLAGS = ("--model", str(TINY_MODEL), "--served-model-name", "tiny", "--seed", "5")
FAST = ("--sim-time-scale", "0.05")


POOL = "tiny"


def pool_yaml(pods: dict[str, str]) -> str:
    """A pool file as the controllers export it: InferencePool default/tiny and one ready pod
    per address ("ip:port" → its role label), each serving only its own port."""
    ports = sorted({int(a.rsplit(":", 1)[1]) for a in pods}) or [8000]
    docs: list[dict] = [
        {
            "apiVersion": "inference.networking.k8s.io/v1",
            "kind": "InferencePool",
            "metadata": {"name": POOL, "namespace": "default"},
            "spec": {
                "selector": {"matchLabels": {"app": POOL}},
                "targetPorts": [{"number": p} for p in ports],
                "endpointPickerRef": {"name": f"{POOL}-epp"},
            },
        }
    ]
    for i, (address, role) in enumerate(pods.items()):
        ip, port = address.rsplit(":", 1)
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": f"{POOL}-{role}-{i}",
                    "namespace": "default",
                    "labels": {"app": POOL, ROLE_LABEL: role},
                    "annotations": {ACTIVE_PORTS_ANNOTATION: port},
                },
                "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]},
            }
        )
    return yaml.safe_dump_all(docs)


def pool_flags(path, prefillers: list[str]) -> list[str]:
    """Write a pool whose prefill pods are `prefillers`; the sidecar's flags to read it."""
    path.write_text(pool_yaml(dict.fromkeys(prefillers, "prefill")))
    return ["--pool-name", POOL, "--pool-file", str(path)]


def connector_cmd(port: int, engine_url: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "infergw.connector",
        "--port",
        str(port),
        "--engine-url",
        engine_url,
        *extra,
    ]


@pytest.mark.slow
def test_simulator_passthrough_and_streaming(sim_factory):
    """`python -m infergw.connector` in front of a real simulator: the openai client sees the same
    output as when it talks to the simulator directly, streamed and not."""
    sim = sim_factory(*SIM_FLAGS, *FAST)
    port = free_port()
    side = f"http://127.0.0.1:{port}"
    with running(connector_cmd(port, sim), ready_url=side + "/health"):
        direct = openai.OpenAI(base_url=sim + "/v1", api_key="x", max_retries=0)
        via = openai.OpenAI(base_url=side + "/v1", api_key="x", max_retries=0)
        args = dict(model="tiny", prompt="The sidecar passes", max_tokens=12, seed=7)
        assert via.completions.create(**args).choices[0].text == (
            direct.completions.create(**args).choices[0].text
        )
        chat = dict(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=10)
        chunks = list(
            via.chat.completions.create(**chat, stream=True, stream_options={"include_usage": True})
        )
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert len(chunks) > 3 and chunks[-1].usage.completion_tokens == 10
        assert streamed == direct.chat.completions.create(**chat).choices[0].message.content
        assert [m.id for m in via.models.list().data] == ["tiny"]
        metrics = requests.get(side + "/metrics", timeout=5).text  # the engine's, not ours
        assert "vllm:num_requests_running" in metrics
        own = requests.get(side + "/connector/metrics", timeout=5).text
        assert 'infergate_connector_requests_total{connector="nixl",mode="passthrough"}' in own
        r = requests.post(
            side + "/v1/completions", json={"model": "nope", "prompt": "x"}, timeout=5
        )
        assert r.status_code == 404 and "nope" in r.json()["error"]["message"]


@pytest.mark.slow
def test_simulators_behind_http_connector(sim_factory, tmp_path):
    """A real prefill simulator and a real decode simulator behind `infergate connector
    --kv-connector http`: both get their leg, the client gets the decode's answer."""
    prefill = sim_factory(*SIM_FLAGS, *FAST)
    decode = sim_factory(*SIM_FLAGS, *FAST)
    port = free_port()
    side = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "infergw.cli", "connector", "--port", str(port)]
    cmd += ["--engine-url", decode, "--kv-connector", "http"]
    hp = prefill.removeprefix("http://")
    cmd += pool_flags(tmp_path / "pool.yaml", [hp])
    with running(cmd, ready_url=side + "/health"):
        body = {"model": "tiny", "prompt": "two legs", "max_tokens": 8, "seed": 3}
        r = requests.post(
            side + "/v1/completions", json=body, headers={"x-prefiller-host-port": hp}, timeout=30
        )
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 8
        assert (
            r.json()["choices"][0]["text"]
            == requests.post(decode + "/v1/completions", json=body, timeout=30).json()["choices"][
                0
            ]["text"]
        )
        assert _successes(prefill) == 1.0  # the one-token prefill leg
        assert _successes(decode) == 2.0  # the decode leg, and our direct comparison

        with requests.post(
            side + "/v1/completions",
            json={**body, "stream": True},
            headers={"x-prefiller-host-port": hp},
            timeout=30,
            stream=True,
        ) as s:
            lines = [ln for ln in s.iter_lines() if ln]
        assert lines[-1] == b"data: [DONE]" and len(lines) == 9
        assert _successes(prefill) == 2.0


def _successes(url: str) -> float:
    total = 0.0
    for line in requests.get(url + "/metrics", timeout=5).text.splitlines():
        if line.startswith("vllm:request_success_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _metric_sum(url: str, name: str) -> float:
    total = 0.0
    for line in requests.get(url + "/metrics", timeout=5).text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.slow
def test_simulators_behind_nixl_connector(sim_factory, tmp_path):
    """A real prefill simulator (--kv-role prefill) and a real decode simulator (--kv-role
    decode) behind the sidecar: the decode pulls the prefill's KV with the params we relay."""
    prefill = sim_factory(*SIM_FLAGS, *FAST, "--kv-role", "prefill")
    decode = sim_factory(*SIM_FLAGS, *FAST, "--kv-role", "decode")
    port = free_port()
    side = f"http://127.0.0.1:{port}"
    pool = pool_flags(tmp_path / "pool.yaml", [prefill.removeprefix("http://")])
    cmd = connector_cmd(port, decode, "--kv-connector", "nixl", *pool)
    with running(cmd, ready_url=side + "/health"):
        hp = {"x-prefiller-host-port": prefill.removeprefix("http://")}
        prompt = "a prompt long enough to fill a few KV blocks " * 8
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 6, "seed": 1}
        r = requests.post(side + "/v1/completions", json=body, headers=hp, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 6
        with requests.post(
            side + "/v1/chat/completions",
            json={
                "model": "tiny",
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": 5,
                "stream": True,
            },
            headers=hp,
            timeout=30,
            stream=True,
        ) as s:
            assert s.status_code == 200
            lines = [ln for ln in s.iter_lines() if ln]
        assert lines[-1] == b"data: [DONE]"
        assert _metric_sum(decode, "vllm:nixl_xfer_time_seconds_count") == 2.0  # two pulls
        assert _metric_sum(decode, "vllm:nixl_num_failed_transfers_total") == 0.0
        for url in (prefill, decode):
            assert _metric_sum(url, "infergate_sim:kv_role_mismatch_total") == 0.0
        assert _metric_sum(prefill, "infergate_sim:kv_held_requests") == 0.0  # all pulled


async def test_sglang_client_disconnect_drops_both_pending_legs(engines, sidecar, client):
    async def hang(request, body):
        await asyncio.sleep(30)

    prefill = await engines("prefill", custom=hang)
    decode = await engines("decode", custom=hang)
    url = await sidecar(decode.url, kv_connector="sglang")
    task = asyncio.create_task(
        client.post(url + "/v1/completions", json=COMPLETION, headers=pd(prefill.host_port))
    )
    await asyncio.wait_for(prefill.arrived.wait(), 3)
    await asyncio.wait_for(decode.arrived.wait(), 3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(prefill.gone.wait(), 3)
    await asyncio.wait_for(decode.gone.wait(), 3)


@pytest.mark.parametrize("mode", ["passthrough", "nixl"])
async def test_silent_engine_is_a_504_not_a_hang(engines, sidecar, client, mode):
    async def hang(request, body):
        await asyncio.sleep(30)

    decode = await engines("decode", custom=hang)
    prefill = await engines("prefill", kv_reply=PREFILL_KV_REPLY)
    url = await sidecar(decode.url, decode_timeout=0.3)
    headers = pd(prefill.host_port) if mode == "nixl" else {}
    t0 = time.monotonic()
    async with client.post(url + "/v1/completions", json=COMPLETION, headers=headers) as r:
        assert r.status == 504
        err = (await r.json())["error"]
    assert time.monotonic() - t0 < 2
    assert err["type"] == "GatewayTimeout" and "sent nothing for 0.3s" in err["message"]
    await asyncio.wait_for(decode.gone.wait(), 3)


# ---- local prefill fallback (--local-prefill-fallback, on by default) -------------------------


async def _own_metrics(client: aiohttp.ClientSession, url: str) -> str:
    async with client.get(url + "/connector/metrics") as r:
        return await r.text()


def test_local_prefill_fallback_flag():
    assert parse_options([]).local_prefill_fallback is True
    assert parse_options(["--no-local-prefill-fallback"]).local_prefill_fallback is False
    assert parse_options(["--local-prefill-fallback"]).local_prefill_fallback is True


@pytest.mark.parametrize("connector", ["nixl", "mooncake", "http", "lmcache"])
async def test_dead_prefiller_falls_back_to_the_local_engine(engines, sidecar, client, connector):
    decode = await engines("decode")
    url = await sidecar(decode.url, kv_connector=connector, prefill_retries=2)
    dead = dead_host_port()
    async with client.post(
        url + "/v1/completions?x=1",
        json=COMPLETION,
        headers=pd(dead, **{"Authorization": "Bearer k", "X-Request-Id": "mine"}),
    ) as r:
        assert r.status == 200
        assert r.headers["X-Engine"] == "decode"
        assert (await r.json())["choices"][0]["message"]["content"] == "from decode"
    # one request to the local engine: the client's, unchanged (no kv_transfer_params, no
    # one-token rewrite), on the same path, without the prefiller header
    (seen,) = decode.seen
    assert seen.path_qs == "/v1/completions?x=1"
    assert seen.body == COMPLETION
    assert seen.headers["Authorization"] == "Bearer k"
    assert "x-prefiller-host-port" not in seen.headers
    text = await _own_metrics(client, url)
    assert (
        f'infergate_connector_prefill_fallbacks_total{{connector="{connector}",'
        'reason="connect_error"} 1.0' in text
    )
    assert (
        f'infergate_connector_prefill_failures_total{{connector="{connector}",'
        'reason="connect_error"} 1.0' in text
    )  # refused once, and not asked again: the retries would only have waited
    assert "infergate_connector_errors_total{" not in text  # the client got no error


async def test_fallback_streams_the_local_answer(engines, sidecar, client):
    decode = await engines("decode")
    url = await sidecar(decode.url)
    async with client.post(
        url + "/v1/chat/completions", json=CHAT, headers=pd(dead_host_port())
    ) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        raw = await r.read()
    assert sse_text(raw) == "Hello!" and raw.endswith(b"data: [DONE]\n\n")
    assert decode.seen[0].body == CHAT  # stream and stream_options kept


async def test_overloaded_prefillers_fall_back_and_the_flag_turns_it_off(engines, sidecar, client):
    busy = await engines("busy", status=503)
    gateway = await engines("gateway", status=504)
    decode = await engines("decode")
    header = pd(f"{busy.host_port},{gateway.host_port}")
    url = await sidecar(decode.url, prefill_retries=1)
    async with client.post(url + "/v1/completions", json=COMPLETION, headers=header) as r:
        assert r.status == 200
    assert len(busy.seen) == 1 and len(gateway.seen) == 1 and len(decode.seen) == 1
    text = await _own_metrics(client, url)
    assert 'prefill_fallbacks_total{connector="nixl",reason="status_504"} 1.0' in text

    off = await sidecar(decode.url, prefill_retries=1, local_prefill_fallback=False)
    async with client.post(off + "/v1/completions", json=COMPLETION, headers=header) as r:
        assert r.status == 502
        assert "no prefiller succeeded after 2 attempts" in (await r.json())["error"]["message"]
    assert len(decode.seen) == 1  # the local engine was not asked
    text = await _own_metrics(client, off)
    assert "infergate_connector_prefill_fallbacks_total{" not in text
    assert 'errors_total{connector="nixl",reason="prefill_exhausted"} 1.0' in text


async def test_prefiller_dying_mid_answer_falls_back(engines, sidecar, client):
    async def dies(request, body):
        request.transport.close()  # as a killed process: the connection just ends
        await asyncio.sleep(1)

    dying = await engines("dying", custom=dies)
    decode = await engines("decode")
    url = await sidecar(decode.url, prefill_retries=0)
    async with client.post(
        url + "/v1/completions", json=COMPLETION, headers=pd(dying.host_port)
    ) as r:
        assert r.status == 200
    assert len(dying.seen) == 1 and decode.seen[0].body == COMPLETION
    text = await _own_metrics(client, url)
    assert 'prefill_fallbacks_total{connector="nixl",reason="disconnected"} 1.0' in text


async def _hang(request, body):
    await asyncio.sleep(30)


async def _answer_500(request, body):
    return web.json_response({"error": {"message": "engine bug"}}, status=500)


@pytest.mark.parametrize(
    "case", ["timeout", "status_500", "status_400", "no_kv_params", "one_timeout_one_dead"]
)
async def test_no_fallback_when_a_prefiller_answered_or_was_slow(engines, sidecar, client, case):
    """Only unreachable or overloaded prefillers send the request to the local engine: a slow
    one (it may still be computing), an error about the request, or a wrong answer stay
    errors the client sees."""
    if case == "timeout" or case == "one_timeout_one_dead":
        prefill = await engines("prefill", custom=_hang)
    elif case == "status_500":
        prefill = await engines("prefill", custom=_answer_500)
    elif case == "status_400":
        prefill = await engines("prefill", status=400)
    else:
        prefill = await engines("prefill")  # answers without kv_transfer_params
    decode = await engines("decode")
    retries = 1 if case == "one_timeout_one_dead" else 0
    url = await sidecar(decode.url, prefill_timeout=0.3, prefill_retries=retries)
    header = prefill.host_port
    if case == "one_timeout_one_dead":
        header += "," + dead_host_port()
    async with client.post(url + "/v1/completions", json=COMPLETION, headers=pd(header)) as r:
        assert r.status == (400 if case == "status_400" else 502)
    assert decode.seen == []
    assert "infergate_connector_prefill_fallbacks_total{" not in await _own_metrics(client, url)


async def test_sglang_has_no_local_fallback(engines, sidecar, client):
    decode = await engines("decode", custom=_hang)
    url = await sidecar(decode.url, kv_connector="sglang", prefill_retries=0)
    async with client.post(
        url + "/v1/completions", json=COMPLETION, headers=pd(dead_host_port())
    ) as r:
        assert r.status == 502
    # the one decode leg of the pair, dropped with it; never a plain request
    assert all("bootstrap_room" in s.body for s in decode.seen)


async def test_fallback_to_a_dead_local_engine_says_both(sidecar, client):
    engine = f"http://{dead_host_port()}"
    url = await sidecar(engine, prefill_retries=0)
    dead = dead_host_port()
    async with client.post(url + "/v1/completions", json=COMPLETION, headers=pd(dead)) as r:
        assert r.status == 502
        msg = (await r.json())["error"]["message"]
    assert f"{dead} connection failed" in msg
    assert "then local prefill fallback: local engine" in msg and "connection failed" in msg
    text = await _own_metrics(client, url)
    assert 'prefill_fallbacks_total{connector="nixl",reason="connect_error"} 1.0' in text
    assert 'errors_total{connector="nixl",reason="engine_connect_error"} 1.0' in text


@pytest.mark.slow
def test_simulator_decode_pod_prefills_itself_when_the_prefiller_is_gone(sim_factory, tmp_path):
    """A real decode simulator behind the sidecar, its prefill pod (still in the pool) gone:
    the request is served aggregated (nothing pulled, the whole prompt computed locally)."""
    decode = sim_factory(*SIM_FLAGS, *FAST, "--kv-role", "decode")
    port = free_port()
    side = f"http://127.0.0.1:{port}"
    gone = dead_host_port()
    pool = pool_flags(tmp_path / "pool.yaml", [gone])
    with running(connector_cmd(port, decode, *pool), ready_url=side + "/health"):
        prompt = "the prefill pod of this request is gone " * 8
        hp = {"x-prefiller-host-port": gone}
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 6, "seed": 1}
        r = requests.post(side + "/v1/completions", json=body, headers=hp, timeout=30)
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        assert usage["completion_tokens"] == 6
        assert usage["prompt_tokens_details"]["cached_tokens"] == 0  # computed here
        direct = requests.post(decode + "/v1/completions", json=body, timeout=30).json()
        assert r.json()["choices"][0]["text"] == direct["choices"][0]["text"]
        assert _metric_sum(decode, "vllm:nixl_xfer_time_seconds_count") == 0.0
        own = requests.get(side + "/connector/metrics", timeout=5).text
        assert 'infergate_connector_prefill_fallbacks_total{connector="nixl"' in own


# ---- the prefill allowlist: only prefill pods of the sidecar's own pool -----------------------


def test_pool_flags():
    o = parse_options(["--pool-name", "tiny", "--pool-namespace", "team-a"])
    assert (o.pool_name, o.pool_namespace, o.pool_file, o.prefiller_grace) == (
        "tiny",
        "team-a",
        None,
        10.0,
    )
    assert parse_options([]).pool_name is None  # no pool: no prefiller allowed
    with pytest.raises(SystemExit):
        parse_options(["--prefiller-grace", "-1"])
    with pytest.raises(SystemExit):
        parse_options(["--prefiller-grace", "inf"])


def test_the_pool_file_defaults_to_what_the_local_kubelet_sets(monkeypatch):
    monkeypatch.setenv(POOL_FILE_ENV, "/state/pool.yaml")
    assert parse_options(["--pool-name", "tiny"]).pool_file == "/state/pool.yaml"
    assert parse_options(["--pool-file", "/x.yaml"]).pool_file == "/x.yaml"


async def until_status(
    client: aiohttp.ClientSession, method: str, url: str, status: int, **kw
) -> aiohttp.ClientResponse:
    """Repeat a request until it answers `status` (a pool reload is asynchronous); a
    generous deadline only bounds a broken run."""
    deadline = time.monotonic() + 60
    while True:
        async with client.request(method, url, **kw) as r:
            await r.read()
            if r.status == status:
                return r
        assert time.monotonic() < deadline, f"{url} never answered {status}"
        await asyncio.sleep(0.1)


async def complete_via(
    client: aiohttp.ClientSession, url: str, prefillers: str
) -> tuple[int, dict]:
    """POST a completion naming `prefillers`: the status and the JSON answer."""
    async with client.post(url + "/v1/completions", json=COMPLETION, headers=pd(prefillers)) as r:
        return r.status, await r.json()


def refused_count(text: str) -> float:
    name = 'infergate_connector_errors_total{connector="nixl",reason="prefiller_not_allowed"}'
    return next((float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith(name)), 0)


async def test_only_prefill_pods_of_the_pool_are_called(engines, sidecar, client, tmp_path):
    prefill = await engines("prefill", kv_reply=PREFILL_KV_REPLY)
    decode = await engines("decode")
    outsider = await engines("outsider", kv_reply=PREFILL_KV_REPLY)  # not in the pool
    other_decode = await engines("other-decode", kv_reply=PREFILL_KV_REPLY)  # a decode pod
    pool = tmp_path / "pool.yaml"
    pool.write_text(pool_yaml({prefill.host_port: "prefill", other_decode.host_port: "decode"}))
    url = await sidecar(decode.url, allowlist=None, pool_name=POOL, pool_file=str(pool))
    await until_status(client, "GET", url + "/health", 200)
    decode.seen.clear()

    refused = [
        outsider.host_port,
        f"{prefill.host_port},{outsider.host_port}",  # one stranger spoils the lot
        f"{outsider.host_port},{prefill.host_port}",
        other_decode.host_port,
        "169.254.169.254:80",  # a metadata service, say
        "[::1]:" + str(prefill.port),
    ]
    for header in refused:
        async with client.post(url + "/v1/chat/completions", json=CHAT, headers=pd(header)) as r:
            assert r.status == 403, header
            err = (await r.json())["error"]
        assert err["type"] == "Forbidden" and err["code"] == 403 and err["param"] is None
        assert f"is not a prefill pod of InferencePool default/{POOL}" in err["message"]
    assert outsider.seen == [] and other_decode.seen == []  # nothing was sent anywhere
    assert prefill.seen == [] and decode.seen == []
    async with client.get(url + "/connector/metrics") as r:
        assert refused_count(await r.text()) == len(refused)

    assert (await complete_via(client, url, prefill.host_port))[0] == 200
    assert len(prefill.seen) == 1 and len(decode.seen) == 1


async def test_without_a_pool_every_prefiller_is_refused(engines, sidecar, client):
    prefill = await engines("prefill", kv_reply=PREFILL_KV_REPLY)
    decode = await engines("decode")
    url = await sidecar(decode.url, allowlist=None)
    status, answer = await complete_via(client, url, prefill.host_port)
    assert status == 403 and "--pool-name" in answer["error"]["message"]
    assert prefill.seen == [] and decode.seen == []
    async with client.post(url + "/v1/completions", json=COMPLETION) as r:
        assert r.status == 200  # without the header: the local engine, as always
    assert len(decode.seen) == 1


async def test_the_allowlist_follows_the_pool_file(engines, sidecar, client, tmp_path):
    first = await engines("first", kv_reply=PREFILL_KV_REPLY)
    second = await engines("second", kv_reply=PREFILL_KV_REPLY)
    decode = await engines("decode")
    pool = tmp_path / "pool.yaml"
    pool.write_text(pool_yaml({first.host_port: "prefill"}))
    url = await sidecar(
        decode.url, allowlist=None, pool_name=POOL, pool_file=str(pool), prefiller_grace=0
    )
    await until_status(client, "GET", url + "/health", 200)
    to = url + "/v1/completions"
    assert (await complete_via(client, url, second.host_port))[0] == 403
    # the first pod leaves the pool, a second comes
    pool.write_text(pool_yaml({second.host_port: "prefill"}))
    await until_status(client, "POST", to, 200, json=COMPLETION, headers=pd(second.host_port))
    assert (await complete_via(client, url, first.host_port))[0] == 403  # gone, no grace
    assert first.seen == [] and len(second.seen) == 1


async def test_a_prefill_pod_that_just_left_the_pool_is_tried_within_the_grace(
    engines, sidecar, client, tmp_path
):
    """The picker may name a pod it has not yet seen go: the sidecar tries it (here it is
    dead) and the local engine serves the request, rather than a 403."""
    gone = dead_host_port()
    other = await engines("other", kv_reply=PREFILL_KV_REPLY)
    decode = await engines("decode")
    pool = tmp_path / "pool.yaml"
    pool.write_text(pool_yaml({gone: "prefill"}))
    url = await sidecar(
        decode.url, allowlist=None, pool_name=POOL, pool_file=str(pool), prefiller_grace=600
    )
    await until_status(client, "GET", url + "/health", 200)
    pool.write_text(pool_yaml({other.host_port: "prefill"}))
    to = url + "/v1/completions"
    await until_status(client, "POST", to, 200, json=COMPLETION, headers=pd(other.host_port))
    decode.seen.clear()
    assert (await complete_via(client, url, gone))[0] == 200
    assert len(decode.seen) == 1 and "kv_transfer_params" not in decode.seen[0].body
    async with client.get(url + "/connector/metrics") as r:
        assert 'prefill_fallbacks_total{connector="nixl",reason="connect_error"} 1.0' in (
            await r.text()
        )


async def test_not_ready_until_the_pool_is_loaded(engines, sidecar, client, tmp_path):
    prefill = await engines("prefill", kv_reply=PREFILL_KV_REPLY)
    decode = await engines("decode")
    pool = tmp_path / "pool.yaml"  # not written yet
    url = await sidecar(decode.url, allowlist=None, pool_name=POOL, pool_file=str(pool))
    async with client.get(url + "/health") as r:
        assert r.status == 503
        assert (
            f"has not loaded InferencePool default/{POOL} yet"
            in (await r.json())["error"]["message"]
        )
    assert (await complete_via(client, url, prefill.host_port))[0] == 403
    assert prefill.seen == [] and decode.seen == []
    pool.write_text(pool_yaml({prefill.host_port: "prefill"}))
    await until_status(client, "GET", url + "/health", 200)
    assert (await complete_via(client, url, prefill.host_port))[0] == 200


async def test_the_pool_from_the_kubernetes_api(engines, sidecar, client, tmp_path, monkeypatch):
    """In a cluster: the InferencePool and its pods by list+watch (the picker's provider), with
    the sidecar's own kubeconfig."""
    prefill = await engines("prefill", kv_reply=PREFILL_KV_REPLY)
    later = await engines("later", kv_reply=PREFILL_KV_REPLY)
    decode = await engines("decode")
    async with KubeAPIEmulator() as kube:
        kubeconfig = kube.write_kubeconfig(tmp_path / "kubeconfig")
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        docs = list(yaml.safe_load_all(pool_yaml({prefill.host_port: "prefill"})))
        pool_obj, pod = docs
        pool_obj["spec"]["targetPorts"] = [{"number": prefill.port}, {"number": later.port}]
        kube.put(pool_obj)
        kube.put(pod)
        url = await sidecar(decode.url, allowlist=None, pool_name=POOL)
        await until_status(client, "GET", url + "/health", 200)
        to = url + "/v1/completions"
        assert (await complete_via(client, url, prefill.host_port))[0] == 200
        assert (await complete_via(client, url, later.host_port))[0] == 403
        assert later.seen == []
        new_pod = list(yaml.safe_load_all(pool_yaml({later.host_port: "prefill"})))[1]
        new_pod["metadata"]["name"] = "tiny-prefill-later"
        kube.put(new_pod)
        await until_status(client, "POST", to, 200, json=COMPLETION, headers=pd(later.host_port))
        assert len(later.seen) == 1
        for runner in sidecar.runners:  # stop the watches before the API goes away
            await runner.cleanup()
        sidecar.runners.clear()


# ---- what reaches the client of an upstream's answer, and hostile bodies -----------------------


async def _garbage_500(request, body):
    return web.Response(status=500, text="<html>Traceback: token=SECRET-1234 at /srv/app.py</html>")


async def test_upstream_error_bodies_are_not_echoed(engines, sidecar, client):
    long_message = "\x1b[31mred\nforged: log line\r\n" + "x" * 10_000

    async def noisy_400(request, body):
        return web.json_response({"error": {"message": long_message}}, status=400)

    noisy = await engines("noisy", custom=noisy_400)
    garbage = await engines("garbage", custom=_garbage_500)
    decode = await engines("decode")
    url = await sidecar(decode.url, local_prefill_fallback=False)
    status, answer = await complete_via(client, url, noisy.host_port)
    message = answer["error"]["message"]
    assert status == 400 and "red" in message and len(message) < 400
    assert message.isprintable()  # no escape sequences, no line breaks
    status, answer = await complete_via(client, url, garbage.host_port)
    message = answer["error"]["message"]
    assert status == 502
    assert "SECRET" not in message and "Traceback" not in message
    assert "a body without an error message" in message


async def test_hostile_bodies_are_400_and_nothing_is_sent(engines, sidecar, client):
    prefill = await engines("prefill", kv_reply=PREFILL_KV_REPLY)
    decode = await engines("decode")
    url = await sidecar(decode.url)
    bodies = {
        "nested 100k deep": b'{"prompt":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        "lone surrogate": b'{"model":"tiny","prompt":"\\ud800"}',
        "5000-digit integer": b'{"model":"tiny","prompt":"x","max_tokens":' + b"9" * 5000 + b"}",
    }
    for name, raw in bodies.items():
        async with client.post(
            url + "/v1/completions",
            data=raw,
            headers={**pd(prefill.host_port), "content-type": "application/json"},
        ) as r:
            assert r.status == 400, name
            assert (await r.json())["error"]["code"] == 400
    assert prefill.seen == [] and decode.seen == []


# ---- property: whatever a client sends, an answer, never a 500 and never a stray leg -----------


class SidecarInThread:
    """A pool-backed sidecar, its allowed prefiller, a stranger and the local engine, served by
    an event loop of their own, so a synchronous hypothesis test can talk to them."""

    def __init__(self, pool_file) -> None:
        self.pool_file = pool_file
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    async def _start(self) -> None:
        self.prefill = await FakeEngine("prefill", kv_reply=PREFILL_KV_REPLY).start()
        self.stranger = await FakeEngine("stranger", kv_reply=PREFILL_KV_REPLY).start()
        self.decode = await FakeEngine("decode").start()
        self.pool_file.write_text(pool_yaml({self.prefill.host_port: "prefill"}))
        opts = ConnectorOptions(
            port=free_port(),
            engine_url=self.decode.url,
            pool_name=POOL,
            pool_file=str(self.pool_file),
        )
        self.runner, proxy = await start_connector_app(opts)
        while not proxy.allowlist.synced:
            await asyncio.sleep(0.01)
        self.url = f"http://127.0.0.1:{opts.port}"

    async def _stop(self) -> None:
        await self.runner.cleanup()
        for engine in (self.prefill, self.stranger, self.decode):
            await engine.stop()

    def __enter__(self) -> SidecarInThread:
        self.thread.start()
        self._run(self._start())
        return self

    def __exit__(self, *exc) -> None:
        self._run(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


json_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),  # lone surrogates included
)
json_docs = st.recursive(
    json_leaves,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
completion_bodies = st.fixed_dictionaries(
    {"model": st.just("tiny"), "prompt": json_docs},
    optional={"max_tokens": json_docs, "stream": json_docs, "messages": json_docs},
).map(lambda d: json.dumps(d).encode())
hostile_blobs = st.one_of(
    st.integers(1000, 200_000).map(lambda n: b'{"prompt":' + b"[" * n + b"]" * n + b"}"),
    st.integers(4301, 6000).map(lambda n: b'{"max_tokens":' + b"7" * n + b"}"),
    st.binary(max_size=64),
    json_docs.map(lambda d: json.dumps(d).encode()),
)
header_text = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=40
)


@pytest.mark.fuzz
def test_any_header_and_body_get_an_answer_and_only_the_pool_is_called(tmp_path):
    with SidecarInThread(tmp_path / "pool.yaml") as side:
        allowed, stranger = side.prefill.host_port, side.stranger.host_port
        headers = st.one_of(
            st.sampled_from([allowed, stranger, f"{allowed},{stranger}", f"{allowed},{allowed}"]),
            header_text,
        )
        session = requests.Session()
        answered: dict[int, int] = {}

        @fuzz_settings(100)
        @given(
            sent=st.lists(
                st.tuples(
                    st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
                    headers,
                    st.one_of(completion_bodies, hostile_blobs),
                ),
                min_size=1,
                max_size=examples(8),
            )
        )
        def run(sent):
            for path, header, body in sent:
                r = session.post(
                    side.url + path,
                    data=body,
                    headers={"x-prefiller-host-port": header, "content-type": "application/json"},
                    timeout=30,
                )
                assert r.status_code in (200, 400, 403), (r.status_code, r.text[:300])
                if r.status_code != 200:
                    error = r.json()["error"]
                    assert set(error) == {"message", "type", "param", "code"}
                    assert error["code"] == r.status_code
                answered[r.status_code] = answered.get(r.status_code, 0) + 1

        run()
        assert side.stranger.seen == []  # never a leg anywhere but the pool's prefill pod
        assert answered.get(403) and answered.get(400) and answered.get(200), answered


async def test_a_prefill_pod_newer_than_the_last_poll_is_allowed_at_once(tmp_path):
    """The picker may name a pod that joined the pool file since the sidecar last polled it:
    the sidecar reads the file again before it refuses, so it never 403s a real prefill pod."""
    from infergw.connector.allowlist import PoolAllowlist, file_pool

    pool = tmp_path / "pool.yaml"
    pool.write_text(pool_yaml({"127.0.0.7:8000": "prefill"}))
    allowlist = PoolAllowlist(
        POOL,
        "default",
        file_pool(pool, POOL, "default", poll_interval=3600),
        grace=0,
    )
    await allowlist.start()
    try:
        for _ in range(200):
            if allowlist.synced:
                break
            await asyncio.sleep(0.01)
        assert allowlist.allows("127.0.0.7:8000")
        assert not allowlist.allows("127.0.0.8:8000")
        pool.write_text(pool_yaml({"127.0.0.7:8000": "prefill", "127.0.0.8:8000": "prefill"}))
        assert allowlist.allows("127.0.0.8:8000")  # no poll ran: the miss read the file
        assert not allowlist.allows("127.0.0.9:8000")
    finally:
        await allowlist.stop()


def test_sigterm_stops_the_sidecar_cleanly(tmp_path):
    """`python -m infergw.connector` waits for SIGTERM with api/signals.py's wait_for_signal,
    then cleans its server up and exits 0 (the engine need not be up for that)."""
    port = free_port()
    log = tmp_path / "connector.log"
    with open(log, "wb") as out:
        proc = spawn(
            connector_cmd(port, f"http://127.0.0.1:{free_port()}"),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_http(f"http://127.0.0.1:{port}/connector/metrics", 30, proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "shutting down" in log.read_text()


# ---- log lines -----------------------------------------------------------------------------

LOG_TRACE = "0af7651916cd43dd8448eb211c80319c"


@pytest.fixture
def json_log():
    """The sidecar's lines, as JSON (api/logs.py), for the length of a test."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    out = io.StringIO()
    logs.configure(logs.LogSettings("json"), out)
    yield out
    root.handlers[:] = handlers
    root.setLevel(level)


async def test_a_failed_request_is_logged_with_its_ids_not_its_prompt(sidecar, client, json_log):
    url = await sidecar("http://" + dead_host_port())
    headers = {"x-request-id": "rid-42", "traceparent": f"00-{LOG_TRACE}-b7ad6b7169203331-01"}
    async with client.post(url + "/v1/completions", json=COMPLETION, headers=headers) as resp:
        assert resp.status == 502
    lines = [json.loads(line) for line in json_log.getvalue().splitlines()]
    failed = [ln for ln in lines if ln["logger"] == "connector" and "local engine" in ln["message"]]
    assert failed
    assert all((ln["request_id"], ln["trace_id"]) == ("rid-42", LOG_TRACE) for ln in failed)
    assert COMPLETION["prompt"] not in json_log.getvalue()
