"""Prefill/decode disaggregation as vLLM's NixlConnector shows it to clients.

A prefill leg (`kv_transfer_params.do_remote_decode`) runs as usual; when it ends length-capped
its blocks are not freed but pinned for a decode pod to pull, and the response names them in
`kv_transfer_params`. A decode leg (`do_remote_prefill`) allocates its blocks, pulls the KV from
the prefill pod, pays a transfer time per block instead of the prefill compute, and caches the
blocks (so its KV events announce them). The pull goes over HTTP to `POST /sim/kv/pull` on the
prefill pod's own port, a stand-in for NIXL's side channel and RDMA read, so a pull of blocks
that are gone fails for real. The prefill pod frees the blocks once pulled, or when the hold
expires (vLLM's VLLM_NIXL_ABORT_REQUEST_TIMEOUT); after that a pull fails with a message that
says why. Unlike NIXL, the pull also returns the tokens the blocks hold, so a decode leg whose
prompt differs from its prefill leg's fails instead of decoding from the wrong KV.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from infergw.simulator.block_pool import Block, BlockPool
from infergw.simulator.config import KVTransferConfig
from infergw.simulator.latency import LatencyModel
from infergw.simulator.request import RemotePrefill, SimRequest
from infergw.simulator.stats import Histogram

log = logging.getLogger("simulator.kv_transfer")

PULL_PATH = "/sim/kv/pull"
_PULL_TIMEOUT = aiohttp.ClientTimeout(total=10, sock_connect=3)
_GONE_MEMORY = 4096  # released request ids remembered, to say why a late pull finds nothing
# vllm:nixl_xfer_time_seconds buckets.
XFER_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 5.0)
_WILDCARD_HOSTS = ("", "0.0.0.0", "::")


class KVTransferError(Exception):
    """A decode leg could not get its KV; the message says what was missing."""


class PullRefused(Exception):
    """The prefill side's answer to a pull it cannot serve."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(slots=True, eq=False)
class _Held:
    """A finished prefill leg's blocks, pinned until pulled or expired (a BlockPool user)."""

    request_id: str
    blocks: list[Block]
    token_ids: list[int]
    timer: asyncio.TimerHandle | None = None
    num_cached_blocks: int = 0


def parse_remote_prefill(params: dict) -> RemotePrefill | None:
    """The pull target of a decode leg's kv_transfer_params; None when a field is missing or of
    the wrong type (vLLM then warns and computes the prompt itself)."""
    ids = params.get("remote_block_ids")
    engine, rid = params.get("remote_engine_id"), params.get("remote_request_id")
    host, port = params.get("remote_host"), params.get("remote_port")
    if not (
        isinstance(ids, list)
        and ids
        and all(isinstance(b, int) and not isinstance(b, bool) for b in ids)
        and isinstance(engine, str)
        and isinstance(rid, str)
        and isinstance(host, str)
        and isinstance(port, int)
        and not isinstance(port, bool)
    ):
        return None
    return RemotePrefill(engine, rid, host, port, list(ids))


class KVTransfer:
    """Both sides of the connector: the blocks this pod holds for decode pods, and its pulls."""

    def __init__(
        self,
        cfg: KVTransferConfig,
        *,
        bind_host: str,
        port: int,
        pool: BlockPool,
        latency: LatencyModel,
    ) -> None:
        self.cfg = cfg
        self.engine_id = cfg.engine_id
        self.role = cfg.role
        self.host = cfg.side_channel_host or (
            bind_host if bind_host not in _WILDCARD_HOSTS else "localhost"  # vLLM's default
        )
        self.port = port
        self.pool = pool
        self.latency = latency
        self.on_release: Callable[[], None] = lambda: None  # freed blocks may admit a request
        self._held: dict[str, _Held] = {}
        self._gone: OrderedDict[str, str] = OrderedDict()
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task] = set()
        self.transfer_time = Histogram(XFER_BUCKETS)
        self.failed_transfers = 0
        self.expired_requests = 0
        self.role_mismatch: Counter[str] = Counter()

    @property
    def num_held_requests(self) -> int:
        return len(self._held)

    def note_leg(self, *, prefill_leg: bool, decode_leg: bool) -> None:
        """Count legs sent to a pod of the other role (served anyway, as vLLM does)."""
        if prefill_leg and self.role == "decode":
            self.role_mismatch["prefill_leg_on_decode_pod"] += 1
        if decode_leg and self.role == "prefill":
            self.role_mismatch["decode_leg_on_prefill_pod"] += 1

    # ---- prefill side ----------------------------------------------------------------------

    def hold(self, req: SimRequest) -> dict[str, Any]:
        """Take a finished prefill leg's blocks; return the kv_transfer_params naming them
        (the fields vLLM's NixlConnector returns)."""
        held = _Held(req.request_id, req.blocks, req.all_token_ids[: req.num_computed_tokens])
        req.blocks, req.num_cached_blocks = [], 0
        held.timer = asyncio.get_running_loop().call_later(
            self.cfg.hold_seconds, self._expire, req.request_id
        )
        self._held[req.request_id] = held
        return {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_block_ids": [b.block_id for b in held.blocks],
            "remote_engine_id": self.engine_id,
            "remote_request_id": req.request_id,
            "remote_host": self.host,
            "remote_port": self.port,
            "tp_size": 1,
        }

    def serve_pull(self, body: Any) -> dict[str, Any]:
        """Hand over (and then free) held blocks, or free them unread (`release_only`)."""
        if not isinstance(body, dict):
            raise PullRefused(400, "the pull body must be a JSON object")
        engine, rid = body.get("engine_id"), body.get("request_id")
        ids = body.get("block_ids", [])
        if not isinstance(engine, str) or not isinstance(rid, str) or not isinstance(ids, list):
            raise PullRefused(400, "a pull needs engine_id, request_id and block_ids")
        if engine != self.engine_id:
            raise PullRefused(
                404,
                f"this pod is engine {self.engine_id}, not {engine} (unknown engine: a "
                "restarted prefill pod gets a new engine id)",
            )
        held = self._held.get(rid)
        if held is None:
            why = self._why(rid)
            raise PullRefused(404, f"engine {engine} holds no KV for request {rid}: {why}")
        if body.get("release_only"):
            self._release(rid, "released")
            return {"released": True}
        positions = {b.block_id: i for i, b in enumerate(held.blocks)}
        missing = [b for b in ids if b not in positions]
        if missing:
            raise PullRefused(
                404,
                f"engine {engine} holds blocks {list(positions)} for request {rid}, not {missing}",
            )
        bs = self.pool.block_size
        blocks = [
            {
                "block_id": b,
                "position": positions[b],
                "token_ids": held.token_ids[positions[b] * bs : (positions[b] + 1) * bs],
            }
            for b in ids
        ]
        self._release(rid, "pulled")  # NIXL's notification: the decode side has read them
        return {"engine_id": engine, "request_id": rid, "block_size": bs, "blocks": blocks}

    def _why(self, rid: str) -> str:
        why = self._gone.get(rid)
        if why == "expired":
            return (
                f"its blocks were freed when the {self.cfg.hold_seconds:g} s hold expired "
                "(VLLM_NIXL_ABORT_REQUEST_TIMEOUT)"
            )
        if why == "pulled":
            return "its blocks were already pulled by a decode pod, and then freed"
        if why == "released":
            return "the decode side released its blocks unread"
        return "this pod never produced KV for it (or forgot it long ago)"

    def _expire(self, rid: str) -> None:
        if rid in self._held:
            self.expired_requests += 1
            log.warning(
                "KV of request %s was not pulled within %g s: freeing its blocks",
                rid,
                self.cfg.hold_seconds,
            )
            self._release(rid, "expired")

    def _release(self, rid: str, why: str) -> None:
        held = self._held.pop(rid)
        if held.timer is not None:
            held.timer.cancel()
        self.pool.free(held)  # the blocks stay cached (evictable), as after any request
        self._gone[rid] = why
        while len(self._gone) > _GONE_MEMORY:
            self._gone.popitem(last=False)
        self.on_release()

    # ---- decode side -----------------------------------------------------------------------

    async def pull(self, req: SimRequest, block_ids: list[int], first_position: int) -> float:
        """Read `block_ids` (the prompt's blocks from `first_position` on) from the prefill pod;
        return the modeled transfer time, which has then passed."""
        r = req.remote_prefill
        assert r is not None
        body = {"engine_id": r.engine_id, "request_id": r.request_id, "block_ids": block_ids}
        try:
            data = await self._post(r, body)
            self._check_tokens(req, data, block_ids, first_position)
        except KVTransferError as exc:
            self.failed_transfers += 1
            raise KVTransferError(
                f"KV transfer failed: prefill pod {r.host}:{r.port}: {exc}"
            ) from None
        seconds = self.latency.transfer_seconds(len(block_ids))
        await asyncio.sleep(seconds)
        self.transfer_time.observe(seconds)
        return seconds

    def _check_tokens(
        self, req: SimRequest, data: Any, block_ids: list[int], first_position: int
    ) -> None:
        bs = self.pool.block_size
        blocks = data.get("blocks") if isinstance(data, dict) else None
        if not isinstance(blocks, list) or len(blocks) != len(block_ids):
            raise KVTransferError("the prefill pod's answer is not a KV pull answer")
        if data.get("block_size") != bs:
            raise KVTransferError(
                f"the prefill pod's block size is {data.get('block_size')}, this pod's is {bs}"
            )
        prompt = req.prompt_token_ids
        for i, block in enumerate(blocks):
            pos = first_position + i
            want = prompt[pos * bs : (pos + 1) * bs]
            # A prefill leg that generated more than one token holds their KV too.
            got = block.get("token_ids") if isinstance(block, dict) else None
            if (
                not isinstance(got, list)
                or block.get("position") != pos
                or got[: len(want)] != want
            ):
                raise KVTransferError(
                    f"remote block {block_ids[i]} holds the KV of other tokens than this "
                    f"prompt's block {pos}: the prefill leg's prompt differs from this one"
                )

    def release_remote(self, r: RemotePrefill) -> None:
        """A decode leg aborted before its pull: tell the prefill pod to free the blocks (vLLM
        sends NIXL's notification with no read)."""

        async def release() -> None:
            body = {"engine_id": r.engine_id, "request_id": r.request_id, "release_only": True}
            try:
                await self._post(r, body)
            except KVTransferError as exc:
                log.info("releasing request %s on %s:%d: %s", r.request_id, r.host, r.port, exc)

        task = asyncio.get_running_loop().create_task(release())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _post(self, r: RemotePrefill, body: dict) -> Any:
        host = f"[{r.host}]" if ":" in r.host else r.host
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=_PULL_TIMEOUT)
        try:
            async with self._session.post(f"http://{host}:{r.port}{PULL_PATH}", json=body) as resp:
                status, text = resp.status, await resp.text()
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
            detail = str(exc) or "timed out"
            raise KVTransferError(
                f"cannot reach its KV side channel for engine {r.engine_id}, request "
                f"{r.request_id} ({type(exc).__name__}: {detail})"
            ) from None
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        if status != 200:
            err = data.get("error") if isinstance(data, dict) else None
            message = err.get("message") if isinstance(err, dict) else None
            raise KVTransferError(message or f"HTTP {status} from {PULL_PATH}: {text[:200]}")
        return data

    async def close(self) -> None:
        for held in self._held.values():
            if held.timer is not None:
                held.timer.cancel()
        for task in list(self._tasks):
            task.cancel()
        if self._session is not None:
            await self._session.close()
            self._session = None
