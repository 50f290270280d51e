"""POST /debug/prefix-scores: what the KV index says about one request body. Parsing and
tokenizing a prompt can take long: they run in a worker thread, so the picker's event loop
(which routes every request) never waits for them; the index is read on the loop."""

from __future__ import annotations

import asyncio
import json

from infergw.epp.context import RequestContext
from infergw.epp.errors import PickerError
from infergw.epp.request import parse_request
from infergw.epp.scheduling.plugins.precise_prefix_cache import PrecisePrefixCacheScorer
from infergw.kvindex.index import DEFAULT_TIER_WEIGHTS


async def prefix_report(raw: bytes, director, view) -> tuple[int, dict]:
    if view is None or director is None:
        return 404, PickerError(404, "no precise-prefix-cache-scorer is configured").body()
    plugin = next(
        (
            p
            for p in director.scheduling.plugins.values()
            if isinstance(p, PrecisePrefixCacheScorer)
        ),
        None,
    )
    kv = view.cache
    try:
        ctx = RequestContext(await asyncio.to_thread(_parse, raw, director))
        prompt = await asyncio.to_thread(kv.prompt, ctx, ctx.request.body.cache_salt)
    except PickerError as exc:
        return exc.status, exc.body()
    if prompt is None:
        return 422, PickerError(
            422,
            f"cannot tokenize for model {ctx.target_model!r}: no "
            "tokenizer is configured for it (--tokenizer)",
        ).body()
    prompt = await kv.fetch(prompt)  # a shared index: one round trip
    endpoints = [e.address for e in director.datastore.endpoints()]
    lengths = kv.matched_blocks(prompt, endpoints)
    weights = plugin.tier_weights if plugin is not None else DEFAULT_TIER_WEIGHTS
    scores = kv.score(prompt, endpoints, weights)
    return 200, {
        "model": ctx.target_model,
        "prompt_tokens": prompt.tokens,
        "prompt_blocks": len(prompt.keys),
        "block_size": kv.block_size,
        "endpoints": [
            {
                "address": a,
                "matched_blocks": lengths.get(a, 0),
                "matched_tokens": lengths.get(a, 0) * kv.block_size,
                "cached_tokens": kv.cached_prefix(prompt, a),
                "score": score,
            }
            for a, score in zip(endpoints, scores, strict=True)
        ],
    }


def _parse(raw: bytes, director):
    """The request the body would be (a PickerError if it is not one)."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise PickerError(400, f"body is not JSON: {exc}") from exc
    path = (
        "/v1/chat/completions"
        if isinstance(body, dict) and "messages" in body
        else "/v1/completions"
    )
    return parse_request(path, raw, {}, max_body_bytes=director.options.max_body_bytes)
