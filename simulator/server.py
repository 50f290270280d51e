"""The HTTP front of the simulator: vLLM's OpenAI-compatible routes on aiohttp."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
from dataclasses import dataclass

from aiohttp import web

from simulator import responses
from simulator.block_hashing import BlockHasher
from simulator.block_pool import BlockPool
from simulator.config import SimulatorConfig
from simulator.engine import Engine, EngineLimits
from simulator.kv_events import KVEventPublisher
from simulator.kv_transfer import PULL_PATH, KVTransfer, PullRefused, parse_remote_prefill
from simulator.metrics import CONTENT_TYPE, MetricsRenderer
from simulator.protocol import (
    ApiError,
    GenerationRequest,
    TemplateOptions,
    parse_chat,
    parse_completion,
    parse_detokenize,
    parse_tokenize,
)
from simulator.request import SamplingParams, SimRequest, Status, TokenOutput
from simulator.tokenization import ChatTemplateError, ModelTokenizer

log = logging.getLogger("simulator.server")

MAX_BODY_BYTES = 32 * 1024 * 1024
VERSION = "0.32.0+infergate.sim"


@dataclass(slots=True)
class LoraAdapter:
    lora_id: int
    name: str
    path: str


class Simulator:
    """Owns the tokenizer, the engine and the event publisher; serves the HTTP routes."""

    def __init__(self, cfg: SimulatorConfig, tokenizer: ModelTokenizer | None = None) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer or ModelTokenizer.from_dir(cfg.model)
        pool = BlockPool(
            cfg.num_gpu_blocks, cfg.block_size, enable_caching=cfg.enable_prefix_caching
        )
        self.max_model_len = _fit_to_cache(
            cfg.max_model_len or self.tokenizer.max_position_embeddings or 4096, pool
        )
        self.loras: dict[str, LoraAdapter] = {}
        self._next_lora_id = 1  # vLLM numbers adapters from 1; ids are never reused
        for module in cfg.lora_modules:
            self._add_lora(module.name, module.path)
        self.publisher = (
            KVEventPublisher(cfg.kv_events, cfg.kv_events_format, bind=cfg.kv_events_bind_pub)
            if cfg.kv_events.active
            else None
        )
        texts = {t: self.tokenizer.decode([t]) for t in self.tokenizer.generation_token_ids()}
        self.kv = KVTransfer(
            cfg.kv_transfer, bind_host=cfg.host, port=cfg.port, pool=pool, latency=cfg.latency
        )
        self.engine = Engine(
            pool=pool,
            hasher=BlockHasher(cfg.block_size, cfg.prefix_caching_hash_algo, cfg.seed),
            limits=EngineLimits(
                cfg.max_num_seqs, cfg.max_num_batched_tokens, self.max_model_len, cfg.max_loras
            ),
            latency=cfg.latency,
            token_texts=texts,
            publish_events=self.publisher.publish if self.publisher else None,
            eos_token_id=self.tokenizer.eos_token_id,
            kv=self.kv,
        )
        self.metrics = MetricsRenderer(self.engine, cfg)

    # ---- app wiring --------------------------------------------------------------------

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[_errors_as_json])
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/tokenize", self.tokenize)
        app.router.add_post("/detokenize", self.detokenize)
        app.router.add_get("/health", self.health)
        app.router.add_route("*", "/ping", self.health)
        app.router.add_get("/version", self.version)
        app.router.add_get("/metrics", self.metrics_handler)
        app.router.add_post("/reset_prefix_cache", self.reset_prefix_cache)
        app.router.add_post("/v1/load_lora_adapter", self.load_lora)
        app.router.add_post("/v1/unload_lora_adapter", self.unload_lora)
        app.router.add_post(PULL_PATH, self.kv_pull)
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        return app

    async def _on_startup(self, _app: web.Application) -> None:
        self.engine.start()
        if self.publisher:
            self.publisher.start()

    async def _on_cleanup(self, _app: web.Application) -> None:
        await self.engine.stop()
        await self.kv.close()
        if self.publisher:
            await self.publisher.close()

    # ---- generation --------------------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        gen = parse_completion(await _json_body(request))
        model, lora = self._resolve_model(gen.model)
        prompts = [self._encode_prompt(p, gen.add_special_tokens) for p in gen.prompts]
        return await self._generate(request, gen, model, lora, prompts, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        gen = parse_chat(await _json_body(request))
        model, lora = self._resolve_model(gen.model)
        text = self._render_chat(gen.messages, gen.template)
        ids = self.tokenizer.encode(text, add_special_tokens=gen.add_special_tokens)
        return await self._generate(request, gen, model, lora, [ids], chat=True)

    async def _generate(
        self,
        request: web.Request,
        gen: GenerationRequest,
        model: str,
        lora: LoraAdapter | None,
        prompts: list[list[int]],
        *,
        chat: bool,
    ) -> web.StreamResponse:
        if gen.kv_transfer_params and len(prompts) > 1:
            raise ApiError(
                400,
                "kv_transfer_params needs a single prompt: one request's KV moves between pods",
                "kv_transfer_params",
            )
        reqs = [self._make_request(gen, lora, ids) for ids in prompts]
        for r in reqs:
            self.engine.add_request(r)
        try:
            if gen.stream:
                return await self._stream(request, gen, model, reqs, chat)
            return await self._collect(gen, model, reqs, chat)
        finally:
            for r in reqs:  # client gone or error: free the engine's resources
                if r.status is not Status.FINISHED:
                    self.engine.abort(r)

    def _make_request(
        self, gen: GenerationRequest, lora: LoraAdapter | None, ids: list[int]
    ) -> SimRequest:
        n = len(ids)
        if n == 0:
            raise ApiError(400, "the prompt is empty after tokenization", "prompt")
        # max_model_len is at most what the KV cache holds (_fit_to_cache), so these checks
        # also refuse a request the cache could never finish.
        limit = self.max_model_len
        if n >= limit:
            raise ApiError(
                400,
                f"This model's maximum context length is {limit} tokens. "
                f"However, your request has {n} input tokens. Please reduce the "
                "length of the input messages.",
                "messages" if gen.messages else "prompt",
            )
        max_tokens = gen.max_tokens if gen.max_tokens is not None else limit - n
        if n + max_tokens > limit:
            raise ApiError(
                400,
                f"'max_tokens' is too large: {max_tokens}. This model's maximum "
                f"context length is {limit} tokens and your request has {n} input "
                f"tokens ({max_tokens} > {limit} - {n}).",
                "max_tokens",
            )
        # Same seed, prompt and request seed give the same output, like greedy decoding.
        digest = hashlib.blake2b(
            repr((self.cfg.seed, gen.seed, ids)).encode(), digest_size=8
        ).digest()
        params = SamplingParams(
            max_tokens=max_tokens,
            min_tokens=gen.min_tokens,
            stop=gen.stop,
            stop_token_ids=gen.stop_token_ids,
            ignore_eos=gen.ignore_eos,
            seed=gen.seed,
        )
        rng = random.Random(int.from_bytes(digest, "big"))
        mean = self.cfg.output_len_mean
        req = SimRequest(
            natural_len=1 + int(rng.expovariate(1 / mean)) if mean > 0 else None,
            request_id=responses.new_id(False),
            prompt_token_ids=ids,
            params=params,
            rng=rng,
            lora_id=lora.lora_id if lora else None,
            lora_name=lora.name if lora else None,
            extra_keys=(lora.name,) if lora else None,
        )
        # Without a KV connector configured, vLLM ignores kv_transfer_params (the prefill leg
        # gets null back and its blocks are freed as usual).
        if gen.kv_transfer_params and self.cfg.kv_transfer.connector:
            self._apply_kv_transfer_params(req, gen.kv_transfer_params)
        return req

    def _apply_kv_transfer_params(self, req: SimRequest, params: dict) -> None:
        """Mark a prefill leg (keep the KV for a remote decode) or a decode leg (pull it)."""
        req.hold_kv = bool(params.get("do_remote_decode"))
        if params.get("do_remote_prefill"):
            req.remote_prefill = parse_remote_prefill(params)
            if req.remote_prefill is None:
                # vLLM's NixlConnector: a warning, and the prompt is computed here.
                log.warning(
                    "invalid kv_transfer_params %s (a decode leg needs remote_block_ids, "
                    "remote_engine_id, remote_request_id, remote_host and remote_port): "
                    "computing the prompt locally",
                    params,
                )
        self.kv.note_leg(prefill_leg=req.hold_kv, decode_leg=req.remote_prefill is not None)

    def _usage(self, reqs: list[SimRequest]) -> dict:
        cached = (
            sum(max(r.num_cached_tokens, 0) for r in reqs)
            if self.cfg.enable_prompt_tokens_details
            else None
        )
        return responses.usage(
            sum(r.num_prompt_tokens for r in reqs),
            sum(len(r.output_token_ids) for r in reqs),
            cached,
        )

    async def _collect(
        self, gen: GenerationRequest, model: str, reqs: list[SimRequest], chat: bool
    ) -> web.Response:
        for r in reqs:
            while True:
                out = await r.outputs.get()
                if out.finish_reason is not None:
                    break
            if out.finish_reason in ("abort", "error"):
                raise ApiError(500, r.error or f"request {r.request_id} failed in the engine")
        use = self._usage(reqs)
        kv_params = reqs[0].kv_transfer_params
        if chat:
            r = reqs[0]
            body = responses.chat_completion(
                responses.new_id(True),
                model,
                r.output_text,
                r.finish_reason,
                r.stop_reason,
                use,
                kv_params,
            )
        else:
            body = responses.completion(
                responses.new_id(False),
                model,
                [(r.output_text, r.finish_reason, r.stop_reason) for r in reqs],
                use,
                kv_params,
            )
        return web.json_response(body, dumps=_dumps)

    async def _stream(
        self,
        request: web.Request,
        gen: GenerationRequest,
        model: str,
        reqs: list[SimRequest],
        chat: bool,
    ) -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
            }
        )
        await resp.prepare(request)
        rid, created = responses.new_id(chat), responses.now()
        if chat:
            await resp.write(
                responses.sse(
                    responses.chat_chunk(
                        rid, created, model, {"role": "assistant", "content": ""}, None, None
                    )
                )
            )
        async for index, out in _merge_outputs(reqs):
            if out.finish_reason in ("abort", "error"):
                # As vLLM: the stream has begun (status 200), so the error is an event in it.
                r = reqs[index]
                message = r.error or f"request {r.request_id} failed in the engine"
                await resp.write(responses.sse(ApiError(500, message).body()))
                break
            if chat:
                chunk = responses.chat_chunk(
                    rid, created, model, {"content": out.text}, out.finish_reason, out.stop_reason
                )
            else:
                chunk = responses.completion_chunk(
                    rid, created, model, index, out.text, out.finish_reason, out.stop_reason
                )
            if gen.continuous_usage:
                chunk["usage"] = self._usage(reqs)
            await resp.write(responses.sse(chunk))
        else:
            if gen.include_usage:
                await resp.write(
                    responses.sse(
                        responses.usage_chunk(rid, created, model, chat, self._usage(reqs))
                    )
                )
        await resp.write(responses.DONE)
        await resp.write_eof()
        return resp

    # ---- models, tokens, health ------------------------------------------------------------

    def _resolve_model(self, name: str | None) -> tuple[str, LoraAdapter | None]:
        if name is None or name in self._served_names():
            return name or self.cfg.model_name, None
        if name in self.loras:
            return name, self.loras[name]
        raise ApiError(404, f"The model `{name}` does not exist.", "model")

    def _served_names(self) -> list[str]:
        return self.cfg.served_model_name or [self.cfg.model_name]

    def _encode_prompt(self, prompt: str | list[int], add_special_tokens: bool) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        return self._check_vocab(prompt, "prompt")

    def _check_vocab(self, ids: list[int], param: str) -> list[int]:
        vocab = self.tokenizer.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ApiError(400, f"token id {bad} is out of vocabulary (size {vocab})", param)
        return list(ids)

    def _render_chat(self, messages: list[dict], options: TemplateOptions) -> str:
        # A template is code, rendered here on the event loop: vLLM runs one from a request
        # only when the operator trusts request templates.
        untrusted = (
            options.chat_template is not None
            or (options.chat_template_kwargs or {}).get("chat_template") is not None
        )
        if untrusted and not self.cfg.trust_request_chat_template:
            raise ApiError(
                400,
                "Chat template is passed with request, but --trust-request-chat-template is "
                "not set. Refused request with untrusted chat template.",
                "chat_template",
            )
        try:
            return self.tokenizer.apply_chat_template(
                messages,
                add_generation_prompt=options.add_generation_prompt,
                continue_final_message=options.continue_final_message,
                tools=options.tools,
                chat_template=options.chat_template,
                chat_template_kwargs=options.chat_template_kwargs,
            )
        except ChatTemplateError as exc:
            raise ApiError(400, str(exc), "messages") from exc

    async def models(self, _request: web.Request) -> web.Response:
        created = responses.now()
        root = self.cfg.model or self.cfg.model_name
        base = [
            responses.model_card(name, created, root, None, self.max_model_len)
            for name in self._served_names()
        ]
        adapters = [
            responses.model_card(a.name, created, a.path, self.cfg.model_name, None)
            for a in self.loras.values()
        ]
        return web.json_response({"object": "list", "data": base + adapters}, dumps=_dumps)

    async def tokenize(self, request: web.Request) -> web.Response:
        tr = parse_tokenize(await _json_body(request))
        self._resolve_model(tr.model)
        if tr.prompt is not None:
            ids = self.tokenizer.encode(tr.prompt, add_special_tokens=tr.add_special_tokens)
        else:
            text = self._render_chat(tr.messages, tr.template)
            ids = self.tokenizer.encode(text, add_special_tokens=tr.add_special_tokens)
        return web.json_response(
            {
                "count": len(ids),
                "max_model_len": self.max_model_len,
                "tokens": ids,
                "token_strs": self.tokenizer.token_strs(ids) if tr.return_token_strs else None,
            },
            dumps=_dumps,
        )

    async def detokenize(self, request: web.Request) -> web.Response:
        dr = parse_detokenize(await _json_body(request))
        self._resolve_model(dr.model)
        ids = self._check_vocab(dr.tokens, "tokens")
        return web.json_response({"prompt": self.tokenizer.decode(ids, skip_special_tokens=False)})

    async def health(self, _request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def version(self, _request: web.Request) -> web.Response:
        return web.json_response({"version": VERSION})

    async def metrics_handler(self, _request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def reset_prefix_cache(self, _request: web.Request) -> web.Response:
        if not self.engine.reset_prefix_cache():
            # vLLM logs and still answers 200 when blocks are in use.
            log.warning(
                "reset_prefix_cache refused: %d requests hold KV blocks", len(self.engine.running)
            )
        return web.Response(status=200)

    async def kv_pull(self, request: web.Request) -> web.Response:
        """The KV side channel (a stand-in for NIXL's): decode pods read held blocks here."""
        try:
            answer = self.kv.serve_pull(await _json_body(request))
        except PullRefused as exc:
            raise ApiError(exc.status, exc.message) from None
        return web.json_response(answer, dumps=_dumps)

    # ---- LoRA adapters at run time (vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING routes) --------

    def _add_lora(self, name: str, path: str) -> LoraAdapter:
        adapter = LoraAdapter(self._next_lora_id, name, path)
        self._next_lora_id += 1
        self.loras[name] = adapter
        return adapter

    async def load_lora(self, request: web.Request) -> web.Response:
        if not self.cfg.enable_lora:
            raise ApiError(400, "LoRA is not enabled: start the server with --enable-lora")
        body = await _json_body(request)
        name = body.get("lora_name") if isinstance(body, dict) else None
        path = body.get("lora_path") if isinstance(body, dict) else None
        if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
            raise ApiError(400, "both 'lora_name' and 'lora_path' must be non-empty strings")
        if name in self.loras:
            raise ApiError(400, f"The lora adapter '{name}' has already been loaded.", "lora_name")
        self._add_lora(name, path)
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def unload_lora(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        name = body.get("lora_name") if isinstance(body, dict) else None
        if not isinstance(name, str) or name not in self.loras:
            raise ApiError(404, f"The lora adapter '{name}' cannot be found.", "lora_name")
        del self.loras[name]
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")


async def _merge_outputs(reqs: list[SimRequest]):
    """Yield (prompt index, output) from several requests as tokens arrive, until all finish."""
    if len(reqs) == 1:
        while True:
            out = await reqs[0].outputs.get()
            yield 0, out
            if out.finish_reason is not None:
                return
    merged: asyncio.Queue[tuple[int, TokenOutput]] = asyncio.Queue()

    async def pump(i: int, r: SimRequest) -> None:
        while True:
            out = await r.outputs.get()
            merged.put_nowait((i, out))
            if out.finish_reason is not None:
                return

    tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(reqs)]
    try:
        remaining = len(reqs)
        while remaining:
            i, out = await merged.get()
            yield i, out
            if out.finish_reason is not None:
                remaining -= 1
    finally:
        for t in tasks:
            t.cancel()


def _dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _fit_to_cache(max_model_len: int, pool: BlockPool) -> int:
    """Lower max_model_len to what the KV cache holds, as vLLM does, so that every request
    admitted can finish: a longer one would preempt itself forever."""
    holds = pool.num_usable * pool.block_size
    if max_model_len <= holds:
        return max_model_len
    log.warning(
        "the KV cache holds %d tokens (%d blocks of %d, besides the null block): "
        "lowering max_model_len from %d to %d",
        holds,
        pool.num_usable,
        pool.block_size,
        max_model_len,
        holds,
    )
    return holds


async def _json_body(request: web.Request):
    raw = await request.read()
    try:
        body = json.loads(raw)
        # Only a \u escape can make a lone surrogate (raw UTF-8 cannot): check only then.
        if b"\\u" in raw:
            json.dumps(body, ensure_ascii=False).encode()
    except UnicodeEncodeError as exc:
        raise ApiError(
            400,
            "the body has a lone UTF-16 surrogate (a \\ud800-\\udfff escape outside a "
            "pair), which is not valid Unicode text",
        ) from exc
    # ValueError: also undecodable UTF-8 and integers over Python's 4300-digit limit.
    except ValueError as exc:
        raise ApiError(400, f"JSON decode error: {exc}") from exc
    except RecursionError as exc:
        raise ApiError(400, "JSON decode error: the body is nested too deeply") from exc
    return body


@web.middleware
async def _errors_as_json(request: web.Request, handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        log.info("%s %s -> %d: %s", request.method, request.path, exc.status, exc.message)
        return web.json_response(exc.body(), status=exc.status)
    except web.HTTPRequestEntityTooLarge as exc:
        return web.json_response(
            ApiError(413, exc.text or "request body too large").body(), status=413
        )
    except web.HTTPNotFound:
        return web.json_response({"detail": "Not Found"}, status=404)
    except web.HTTPMethodNotAllowed:
        return web.json_response({"detail": "Method Not Allowed"}, status=405)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return web.json_response(ApiError(500, "internal server error").body(), status=500)
