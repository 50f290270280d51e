"""The HTTP front of the simulator: vLLM's OpenAI-compatible routes on aiohttp."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from aiohttp import web

from infergw.api import log_context
from infergw.simulator import (
    anthropic,
    request_trace,
    responses,
    responses_api,
    scoring,
    tool_calls,
)
from infergw.simulator.block_hashing import BlockHasher
from infergw.simulator.block_pool import BlockPool
from infergw.simulator.config import SimulatorConfig
from infergw.simulator.engine import Engine, EngineLimits
from infergw.simulator.kv_events import KVEventPublisher
from infergw.simulator.kv_transfer import PULL_PATH, KVTransfer, PullRefused
from infergw.simulator.metrics import CONTENT_TYPE, MetricsRenderer
from infergw.simulator.prompts import PromptEncoder
from infergw.simulator.protocol import (
    ApiError,
    GenerationRequest,
    TokenizeRequest,
    decode_json,
    parse_chat,
    parse_completion,
    parse_detokenize,
    parse_tokenize,
)
from infergw.simulator.request import SimRequest, Status
from infergw.simulator.request_builder import RequestBuilder
from infergw.simulator.response_store import ResponseStore
from infergw.simulator.served_models import LoraAdapter, ServedModels
from infergw.simulator.tokenization import ModelTokenizer
from infergw.simulator.tokenizer_threads import TokenizerThreads

log = logging.getLogger("simulator.server")

MAX_BODY_BYTES = 32 * 1024 * 1024
VERSION = "0.32.0+infergate.sim"


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
        self.served = ServedModels(cfg)
        self.stored_responses = ResponseStore()
        self.prompts = PromptEncoder(
            self.tokenizer,
            trust_request_chat_template=cfg.trust_request_chat_template,
            max_model_len=self.max_model_len,
        )
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
        self.requests = RequestBuilder(cfg, self.max_model_len, self.kv)
        self.threads = TokenizerThreads()
        self.metrics = MetricsRenderer(self.engine, cfg)
        self.system_fingerprint = responses.system_fingerprint(
            cfg.fingerprint_mode,
            cfg.fingerprint_value,
            VERSION,
            (cfg.model_name, cfg.block_size, cfg.num_gpu_blocks, self.max_model_len, cfg.seed),
        )

    # ---- app wiring --------------------------------------------------------------------

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[_errors_as_json])
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/messages", self.messages)
        app.router.add_post("/v1/responses", self.responses)
        # As vLLM: retrieve and cancel; no DELETE (a client's gets 405).
        app.router.add_get("/v1/responses/{response_id}", self.stored_response)
        app.router.add_post("/v1/responses/{response_id}/cancel", self.cancel_response)
        for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
            app.router.add_post(path, self.rerank)
        for path in ("/score", "/v1/score"):
            app.router.add_post(path, self.score)
        app.router.add_post("/v1/audio/transcriptions", self.transcriptions)
        app.router.add_post("/v1/audio/translations", self.transcriptions)
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
        self.threads.close()

    # ---- generation --------------------------------------------------------------------

    async def _body(self, request: web.Request) -> tuple[Any, int]:
        """The request's JSON, parsed off the loop, and its size in bytes (how much work
        the request is, to pick its tokenizing thread)."""
        raw = await request.read()
        return await self.threads.run(len(raw), decode_json, raw), len(raw)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body, size = await self._body(request)
        gen = await self.threads.run(size, parse_completion, body)  # millions of ids: seconds
        model, lora = self.served.resolve(gen.model)
        prompts = await self.threads.run(
            size, self.prompts.encode_all, gen.prompts, gen.add_special_tokens
        )
        return await self._generate(request, gen, model, lora, prompts, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body, size = await self._body(request)
        gen = parse_chat(body)
        gen.tool_call = tool_calls.forced_tool(body)
        model, lora = self.served.resolve(gen.model)
        text, ids = await self.threads.run(
            size, self.prompts.chat_prompt, gen.messages, gen.template, gen.add_special_tokens
        )
        if gen.return_prompt_text:
            gen.prompt_text = text
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
        reqs = [self.requests.build(gen, lora, ids) for ids in prompts]
        span = request_trace.begin(request.headers, request.path, gen.model)
        for r in reqs:
            self.engine.add_request(r)
        head = responses.AnswerHead.new(model, chat, self.system_fingerprint)
        status = 499  # the client left, unless an answer or an error says otherwise
        try:
            if gen.stream:
                answer = await self._stream(request, gen, head, reqs)
            else:
                answer = await self._collect(gen, head, reqs)
            status = answer.status
            return answer
        except ApiError as exc:
            status = exc.status
            raise
        finally:
            for r in reqs:  # client gone or error: free the engine's resources
                if r.status is not Status.FINISHED:
                    self.engine.abort(r)
            request_trace.finish(span, reqs, status)

    def _usage(self, reqs: list[SimRequest], details_of: SimRequest, chat: bool) -> dict:
        details = details_of if self.cfg.enable_prompt_tokens_details else None
        return responses.usage_of(reqs, details, chat=chat)

    async def _collect(
        self, gen: GenerationRequest, head: responses.AnswerHead, reqs: list[SimRequest]
    ) -> web.Response:
        for r in reqs:
            while True:
                out = await r.outputs.get()
                if out.finish_reason is not None:
                    break
            if out.finish_reason in ("abort", "error"):
                raise ApiError(500, r.error or f"request {r.request_id} failed in the engine")
        # vLLM's completions report the last prompt's cache details.
        use = self._usage(reqs, reqs[-1], head.chat)
        kv_params = reqs[0].kv_transfer_params
        if head.chat:
            body = responses.chat_completion(
                head,
                reqs[0],
                use,
                return_token_ids=gen.return_token_ids,
                prompt_text=gen.prompt_text,
                kv_transfer_params=kv_params,
            )
            if gen.tool_call is not None:
                choice = body["choices"][0]
                choice["message"]["tool_calls"] = [
                    tool_calls.tool_call(gen.tool_call, choice["message"]["content"])
                ]
                choice["message"]["content"] = None
                choice["finish_reason"] = tool_calls.FINISH_REASON
        else:
            body = responses.completion(
                head, reqs, use, return_token_ids=gen.return_token_ids, kv_transfer_params=kv_params
            )
        return web.json_response(body, dumps=_dumps)

    async def _stream(
        self,
        request: web.Request,
        gen: GenerationRequest,
        head: responses.AnswerHead,
        reqs: list[SimRequest],
    ) -> web.StreamResponse:
        resp = await _event_stream(request)
        chat, ids = head.chat, gen.return_token_ids
        if chat:
            first = responses.chat_first_chunk(
                head, reqs[0].prompt_token_ids if ids else None, gen.prompt_text
            )
            if gen.continuous_usage:
                first["usage"] = responses.running_usage(reqs[0], chat=True)
            await resp.write(responses.sse(first))
        prompt_sent = [False] * len(reqs)
        first_out: SimRequest | None = None  # vLLM's stream reports its cache details
        async for index, out in responses.merge_outputs(reqs):
            r = reqs[index]
            if out.finish_reason in ("abort", "error"):
                # As vLLM: the stream has begun (status 200), so the error is an event in it.
                message = r.error or f"request {r.request_id} failed in the engine"
                await resp.write(responses.sse(ApiError(500, message).body()))
                break
            first_out = first_out or r
            token_ids = [out.token_id] if ids else None
            if chat and gen.tool_call is not None:
                if out.finish_reason is None:
                    continue  # the call goes in one chunk once its arguments are complete
                chunk = responses.chat_chunk(head, out, token_ids)
                call = tool_calls.tool_call(gen.tool_call, r.output_text)
                choice = chunk["choices"][0]
                choice["delta"] = {"content": None, "tool_calls": [{"index": 0, **call}]}
                choice["finish_reason"] = tool_calls.FINISH_REASON
            elif chat:
                chunk = responses.chat_chunk(head, out, token_ids)
            else:
                # return_token_ids: a prompt's ids ride on its first chunk only.
                prompt_ids = r.prompt_token_ids if ids and not prompt_sent[index] else None
                prompt_sent[index] = True
                chunk = responses.completion_chunk(head, index, out, prompt_ids, token_ids)
            if not gen.include_usage and out.finish_reason and head.system_fingerprint:
                chunk["system_fingerprint"] = head.system_fingerprint  # on terminal chunks
            if gen.continuous_usage:
                chunk["usage"] = responses.running_usage(r, chat=chat)
            await resp.write(responses.sse(chunk))
        else:
            if gen.include_usage:
                use = self._usage(reqs, first_out or reqs[0], chat)
                await resp.write(responses.sse(responses.usage_chunk(head, use)))
        await resp.write(responses.DONE)
        await resp.write_eof()
        return resp

    async def _start_chat(self, chat: dict, size: int) -> tuple[str, SimRequest]:
        """A chat request other APIs amount to, in the engine: the model to answer with."""
        gen = parse_chat(chat)
        model, lora = self.served.resolve(gen.model)
        _, ids = await self.threads.run(
            size, self.prompts.chat_prompt, gen.messages, gen.template, gen.add_special_tokens
        )
        req = self.requests.build(gen, lora, ids)
        self.engine.add_request(req)
        return model, req

    async def _finished(self, req: SimRequest) -> SimRequest:
        while (await req.outputs.get()).finish_reason is None:
            pass
        if req.finish_reason in ("abort", "error"):
            raise ApiError(500, req.error or f"request {req.request_id} failed in the engine")
        return req

    async def messages(self, request: web.Request) -> web.StreamResponse:
        """Anthropic's Messages API: a chat generation, answered in Anthropic's shape."""
        body, size = await self._body(request)
        chat = anthropic.to_chat(body)
        model, req = await self._start_chat(chat, size)
        message_id = anthropic.new_id()
        try:
            if not chat.get("stream"):
                await self._finished(req)
                return web.json_response(anthropic.message(message_id, model, req), dumps=_dumps)
            resp = await _event_stream(request)
            async for event in anthropic.events(message_id, model, req):
                await resp.write(event)
            await resp.write_eof()
            return resp
        finally:
            if req.status is not Status.FINISHED:  # client gone or error: free its resources
                self.engine.abort(req)

    async def responses(self, request: web.Request) -> web.StreamResponse:
        """OpenAI's Responses API, its plain text exchange (simulator/responses_api.py),
        stored unless `store` is false; `previous_response_id` continues a stored one."""
        body, size = await self._body(request)
        previous = responses_api.previous_id(body)
        earlier = self.stored_responses.get(previous).messages if previous else ()
        chat = responses_api.to_chat(body, earlier)
        store = responses_api.stores(body)
        model, req = await self._start_chat(chat, size)
        head = responses_api.Head(model, responses.now(), previous, store)

        def keep(answer: dict) -> None:
            if store:
                asked = chat["messages"][1:] if body.get("instructions") else chat["messages"]
                said = {"role": "assistant", "content": req.output_text}
                self.stored_responses.put(answer, [*asked, said])

        try:
            if not body.get("stream"):
                await self._finished(req)
                answer = responses_api.response(head, req)
                keep(answer)
                return web.json_response(answer, dumps=_dumps)
            resp = await _event_stream(request)
            async for event in responses_api.events(head, req, keep):
                await resp.write(event)
            await resp.write_eof()
            return resp
        finally:
            if req.status is not Status.FINISHED:
                self.engine.abort(req)

    async def stored_response(self, request: web.Request) -> web.Response:
        """`GET /v1/responses/{id}`: a stored answer, as it was sent."""
        stored = self.stored_responses.get(request.match_info["response_id"])
        return web.json_response(stored.answer, dumps=_dumps)

    async def cancel_response(self, request: web.Request) -> web.Response:
        """`POST /v1/responses/{id}/cancel`: only background responses can be, and none is
        simulated, so a stored one answers as vLLM does for a finished one."""
        self.stored_responses.get(request.match_info["response_id"])
        raise ApiError(400, "Cannot cancel a synchronous response.")

    # ---- rerank, score, audio: answers without generation ----------------------------------

    def _count(self, text: str) -> int:
        return len(self.prompts.tokenize(text, True, "documents"))

    async def rerank(self, request: web.Request) -> web.Response:
        body, size = await self._body(request)
        model, _ = self.served.resolve(body.get("model") if isinstance(body, dict) else None)
        answer = await self.threads.run(size, scoring.rerank, body, model, self._count)
        return web.json_response(answer, dumps=_dumps)

    async def score(self, request: web.Request) -> web.Response:
        body, size = await self._body(request)
        model, _ = self.served.resolve(body.get("model") if isinstance(body, dict) else None)
        answer = await self.threads.run(size, scoring.score, body, model, self._count)
        return web.json_response(answer, dumps=_dumps)

    async def transcriptions(self, request: web.Request) -> web.Response:
        """An upload's form is read (its model resolved); the transcript is canned."""
        if not request.content_type.startswith("multipart/"):
            raise ApiError(400, "the body must be multipart/form-data")
        try:
            form = await request.post()
        except ValueError as exc:
            raise ApiError(400, f"the form cannot be read: {exc}") from None
        if not isinstance(form.get("file"), web.FileField):
            raise ApiError(400, "'file' is required: the audio to transcribe", "file")
        model = form.get("model")
        self.served.resolve(model if isinstance(model, str) else None)
        fmt = form.get("response_format")
        content_type, text = scoring.transcription(fmt if isinstance(fmt, str) else None)
        return web.Response(text=text, content_type=content_type)

    # ---- models, tokens, health ------------------------------------------------------------

    async def models(self, _request: web.Request) -> web.Response:
        cards = self.served.cards(self.max_model_len)
        return web.json_response({"object": "list", "data": cards}, dumps=_dumps)

    async def tokenize(self, request: web.Request) -> web.Response:
        body, size = await self._body(request)
        tr = parse_tokenize(body)
        self.served.resolve(tr.model)
        text = await self.threads.run(size, self._tokenize_answer, tr)
        return web.Response(text=text, content_type="application/json")

    def _tokenize_answer(self, tr: TokenizeRequest) -> str:
        """/tokenize's answer as JSON text: encoding, and dumping a million ids, are slow."""
        if tr.prompt is not None:
            ids = self.prompts.tokenize(tr.prompt, tr.add_special_tokens, "prompt")
        else:
            ids = self.prompts.encode_chat(tr.messages, tr.template, tr.add_special_tokens)
        answer = {
            "count": len(ids),
            "max_model_len": self.max_model_len,
            "tokens": ids,
            "token_strs": self.tokenizer.token_strs(ids) if tr.return_token_strs else None,
        }
        return _dumps(answer)

    async def detokenize(self, request: web.Request) -> web.Response:
        body, size = await self._body(request)
        dr = await self.threads.run(size, parse_detokenize, body)
        self.served.resolve(dr.model)
        text = await self.threads.run(size, self._detokenize, dr.tokens)
        return web.json_response({"prompt": text})

    def _detokenize(self, tokens: list[int]) -> str:
        ids = self.prompts.check_vocab(tokens, "tokens")
        return self.tokenizer.decode(ids, skip_special_tokens=False)

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

    async def load_lora(self, request: web.Request) -> web.Response:
        if not self.cfg.enable_lora:
            raise ApiError(400, "LoRA is not enabled: start the server with --enable-lora")
        body = await _json_body(request)
        name = body.get("lora_name") if isinstance(body, dict) else None
        path = body.get("lora_path") if isinstance(body, dict) else None
        if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
            raise ApiError(400, "both 'lora_name' and 'lora_path' must be non-empty strings")
        if name in self.served.loras:
            raise ApiError(400, f"The lora adapter '{name}' has already been loaded.", "lora_name")
        self.served.add_lora(name, path)
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def unload_lora(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        name = body.get("lora_name") if isinstance(body, dict) else None
        if not isinstance(name, str) or not self.served.remove_lora(name):
            raise ApiError(404, f"The lora adapter '{name}' cannot be found.", "lora_name")
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")


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
    return decode_json(await request.read())


@web.middleware
async def _errors_as_json(request: web.Request, handler) -> web.StreamResponse:
    # aiohttp runs each request in a task of its own: its log lines name it (api/log_context.py).
    log_context.bind_request(request.headers)
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


async def _event_stream(request: web.Request) -> web.StreamResponse:
    """A server-sent event stream, prepared (its headers sent) for the answer's events."""
    resp = web.StreamResponse(
        headers={"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
    )
    await resp.prepare(request)
    return resp
