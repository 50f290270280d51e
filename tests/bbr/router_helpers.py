"""The body-based router as its tests drive it: one built over a table of objects, a request
sent through its ext_proc stream in chunks, a chat body naming a model."""

from __future__ import annotations

import json

from infergw.bbr.extproc import BodyRouter, RouterOptions
from infergw.bbr.metrics import RouterMetrics
from infergw.bbr.sources import Table
from infergw.epp.body_budget import BodyBudget
from tests import extproc_client as ec
from tests.bbr.objects import two_models

LIMIT = 1024 * 1024


def router(
    *, pass_bad_bodies=False, limit=LIMIT, budget=16 * LIMIT, objects=None, body_timeout=60.0
):
    metrics = RouterMetrics()
    table = Table("default", metrics)
    table.replace(objects if objects is not None else two_models())
    options = RouterOptions(limit, pass_bad_bodies, body_timeout)
    return BodyRouter(table, options, BodyBudget(budget), metrics)


async def send(servicer, body: bytes, path="/v1/chat/completions", headers=None, chunk=62_000):
    parts = [body[i : i + chunk] for i in range(0, len(body), chunk)] or [b""]
    messages = [ec.headers(path, extra=headers)]
    messages += [ec.body(p, eos=i == len(parts) - 1) for i, p in enumerate(parts)]
    return await ec.process(servicer, messages)


def chat(model: str) -> bytes:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]}).encode()
