"""The engine's own API for LoRA adapters at run time, in each engine's words.

- vLLM (with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True): `POST /v1/load_lora_adapter`
  `{"lora_name", "lora_path"}` and `POST /v1/unload_lora_adapter` `{"lora_name"}`; 200 with a
  text answer, else an error JSON (`{"error": {"message"}}`, older releases `{"message"}`).
  `GET /v1/models` lists the base model and every adapter loaded.
- SGLang: `POST /load_lora_adapter` `{"lora_name", "lora_path"}` and `POST
  /unload_lora_adapter` `{"lora_name"}`, answered `{"success", "error_message",
  "loaded_adapters"}` (400 when it fails); its /v1/models is not relied on to list adapters.
An adapter the engine says is already loaded counts as loaded, one it cannot find as
unloaded: the sidecar may have restarted, or loaded it on an earlier pass. Any other refusal is
EngineRefused with the engine's status and its own words (clipped).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import aiohttp

from infergw.api.lora_adapters import ENGINE_APIS, SGLANG_API, VLLM_API

MESSAGE_CHARS = 300  # of an engine's answer, in status and logs
MAX_ANSWER_BYTES = 1 << 20  # an answer read whole (a model list, an error)
LOAD_FAILED = "LoadFailed"
UNLOAD_FAILED = "UnloadFailed"
ENGINE_UNAVAILABLE = "EngineUnavailable"
_ALREADY_LOADED = re.compile(r"already (been )?(loaded|added)", re.IGNORECASE)
_NOT_FOUND = re.compile(r"(cannot|can't|could not) be found|not (found|loaded)", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Paths:
    load: str
    unload: str
    # /v1/models names the adapters loaded (vLLM); else the sidecar keeps its own record of
    # what it loaded, forgotten whenever the engine stops answering (it may have restarted)
    lists_adapters: bool
    models: str = "/v1/models"
    health: str = "/health"


PATHS = {
    VLLM_API: Paths("/v1/load_lora_adapter", "/v1/unload_lora_adapter", lists_adapters=True),
    SGLANG_API: Paths("/load_lora_adapter", "/unload_lora_adapter", lists_adapters=False),
}


class EngineRefused(Exception):
    """The engine did not do it (or could not be asked): a status reason and its words."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MESSAGE_CHARS else text[: MESSAGE_CHARS - 1] + "…"


def _json(data: bytes | str) -> object:
    """An engine's answer as JSON; ValueError if it is not JSON, also when it nests too deep
    for the parser (a RecursionError would escape every caller's handling)."""
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("JSON nested too deep") from None


def _words(status: int, body: bytes) -> str:
    """What the engine said: the message of its error JSON, else its text."""
    text = body.decode(errors="replace")
    try:
        doc = _json(text)
    except ValueError:
        return clip(text) or f"HTTP {status}"
    if isinstance(doc, dict):
        error = doc.get("error")
        for value in (
            error.get("message") if isinstance(error, dict) else error,
            doc.get("message"),
            doc.get("error_message"),
            doc.get("detail"),
        ):
            if isinstance(value, str) and value:
                return clip(value)
    return clip(text)


class EngineApi:
    """One engine's adapter routes at `base_url` (http://host:port)."""

    def __init__(self, engine: str, base_url: str, session: aiohttp.ClientSession) -> None:
        if engine not in PATHS:
            raise ValueError(f"engine {engine!r}: one of {', '.join(ENGINE_APIS)}")
        self.paths = PATHS[engine]
        self.base_url = base_url.rstrip("/")
        self.session = session

    async def _call(self, method: str, path: str, body: dict | None) -> tuple[int, bytes]:
        url = self.base_url + path
        try:
            async with self.session.request(method, url, json=body, allow_redirects=False) as resp:
                data = await resp.content.read(MAX_ANSWER_BYTES)
                return resp.status, data
        except TimeoutError:  # its str() is empty: say what the wait was
            limit = self.session.timeout.total
            raise EngineRefused(
                ENGINE_UNAVAILABLE, f"{method} {url}: no whole answer within {limit:g} s"
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise EngineRefused(
                ENGINE_UNAVAILABLE, f"{method} {url}: {clip(str(exc)) or type(exc).__name__}"
            ) from None

    async def health(self) -> None:
        """EngineRefused unless the engine's health check answers 200."""
        status, body = await self._call("GET", self.paths.health, None)
        if status != 200:
            raise EngineRefused(
                ENGINE_UNAVAILABLE, f"{self.paths.health} answered {status}: {_words(status, body)}"
            )

    async def models(self) -> set[str]:
        """The names /v1/models lists (the base model's and every adapter's)."""
        status, body = await self._call("GET", self.paths.models, None)
        if status != 200:
            raise EngineRefused(
                ENGINE_UNAVAILABLE, f"{self.paths.models} answered {status}: {_words(status, body)}"
            )

        try:
            doc = _json(body)
            data = doc["data"]
            return {str(m["id"]) for m in data if isinstance(m, dict) and "id" in m}
        except (ValueError, KeyError, TypeError):
            raise EngineRefused(
                ENGINE_UNAVAILABLE, f"{self.paths.models}: not an OpenAI model list"
            ) from None

    async def load(self, name: str, path: str) -> None:
        status, body = await self._call(
            "POST", self.paths.load, {"lora_name": name, "lora_path": path}
        )
        words = _words(status, body)
        if _succeeded(status, body) or _ALREADY_LOADED.search(words):
            return
        raise EngineRefused(LOAD_FAILED, f"the engine answered {status}: {words}")

    async def unload(self, name: str) -> None:
        status, body = await self._call("POST", self.paths.unload, {"lora_name": name})
        words = _words(status, body)
        if _succeeded(status, body) or status == 404 or _NOT_FOUND.search(words):
            return
        raise EngineRefused(UNLOAD_FAILED, f"the engine answered {status}: {words}")


def _succeeded(status: int, body: bytes) -> bool:
    """200, and not SGLang's `"success": false`."""
    if status != 200:
        return False

    try:
        doc = _json(body)
    except ValueError:
        return True  # vLLM's text answer
    return not (isinstance(doc, dict) and doc.get("success") is False)
