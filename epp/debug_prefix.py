"""POST /debug/prefix-scores: what the KV index says about one request body. Parsing and
tokenizing a prompt can take long: they run in a worker thread, so the picker's event loop
(which routes every request) never waits for them; the index is read on the loop."""

from __future__ import annotations

import asyncio
import json

from epp.errors import PickerError
from epp.request import parse_request


async def prefix_report(raw: bytes, director, view) -> tuple[int, dict]:
    if view is None or director is None:
        return 404, PickerError(404, "no precise-prefix-cache-scorer is configured").body()
    plugin = next(
        (
            p
            for p in director.scheduling.plugins.values()
            if getattr(p, "needs_kv_cache_view", False)
        ),
        None,
    )
    try:
        req, blocks = await asyncio.to_thread(_tokenize, raw, director, plugin)
    except PickerError as exc:
        return exc.status, exc.body()
    if blocks is None:
        return 422, PickerError(
            422,
            f"cannot tokenize for model {req.target_model!r}: no "
            "tokenizer is configured for it (--tokenizer)",
        ).body()
    endpoints = [e.address for e in director.datastore.endpoints()]
    index = view.index
    lengths = index.match_lengths(blocks.keys, endpoints)
    weighted = index.lookup(blocks.keys, endpoints, tier_weights=plugin.tier_weights)
    total = len(blocks.keys)
    return 200, {
        "model": req.target_model,
        "prompt_tokens": blocks.tokens,
        "prompt_blocks": total,
        "block_size": index.block_size,
        "endpoints": [
            {
                "address": a,
                "matched_blocks": lengths.get(a, 0),
                "matched_tokens": lengths.get(a, 0) * index.block_size,
                "score": (weighted.get(a, 0.0) / total) if total else 0.0,
            }
            for a in endpoints
        ],
    }


def _tokenize(raw: bytes, director, plugin):
    """The parsed request and its prompt's index keys (None: no tokenizer for its model)."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise PickerError(400, f"body is not JSON: {exc}") from exc
    path = (
        "/v1/chat/completions"
        if isinstance(body, dict) and "messages" in body
        else "/v1/completions"
    )
    req = parse_request(path, raw, {}, max_body_bytes=director.options.max_body_bytes)
    return req, plugin.blocks(req) if plugin is not None else None
