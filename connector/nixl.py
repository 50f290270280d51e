"""The nixl connector (vLLM's NixlConnector; mooncake on vllm-ascend speaks the same): a one-token
prefill that asks the prefiller to keep the KV for a remote decode, then the decode with the
`kv_transfer_params` the prefiller returned, so the local engine pulls the KV."""

from __future__ import annotations

from aiohttp import web

from infergw.connector.prefill import run_prefill
from infergw.connector.upstream import Exchange, LegError, dumps, run_decode


def prefill_kv_params() -> dict:
    return {
        "do_remote_decode": True,
        "do_remote_prefill": False,
        "remote_engine_id": None,
        "remote_block_ids": None,
        "remote_host": None,
        "remote_port": None,
    }


def prefill_body(body: dict) -> dict:
    """As llm-d's sidecar: not streamed, one token (min_tokens too, so the prefill ends
    length-capped — the only way vLLM hands the KV over), and a remote decode asked for."""
    out = dict(body)
    out.pop("stream_options", None)
    out["stream"] = False
    out["max_tokens"] = 1
    out["max_completion_tokens"] = 1
    out["min_tokens"] = 1
    out["kv_transfer_params"] = prefill_kv_params()
    return out


def decode_body(body: dict, kv_transfer_params: dict) -> dict:
    """The client's request as sent, plus where to pull the KV from."""
    return {**body, "kv_transfer_params": kv_transfer_params}


class NixlConnector:
    local_fallback = True  # the decode engine can prefill a request itself

    def __init__(self, name: str = "nixl") -> None:
        self.name = name

    async def handle(self, ex: Exchange) -> web.StreamResponse:
        reply = await run_prefill(ex, dumps(prefill_body(ex.body)))
        params = reply.body.get("kv_transfer_params")
        if not isinstance(params, dict) or not params:
            ex.metrics.prefill_failed("missing_kv_transfer_params")
            got = "no" if params is None else f"unusable ({type(params).__name__})"
            raise LegError(
                502,
                f"prefill leg failed: prefiller {reply.host} answered with {got} "
                f"kv_transfer_params, so the decode cannot pull its KV; is it a vLLM prefill "
                f"pod with the {self.name} KV connector (kv_role kv_producer or kv_both)?",
                "missing_kv_transfer_params",
            )
        return await run_decode(ex, decode_body(ex.body, params))
