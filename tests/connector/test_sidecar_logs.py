"""The P/D sidecar's log lines name the request they were written for (its x-request-id and
traceparent), as the picker's do: the real sidecar server in this process, its lines in JSON."""

from __future__ import annotations

import io
import json
import logging

import pytest

from infergw.api import logs
from tests.connector.test_sidecar import COMPLETION, client, dead_host_port, sidecar  # noqa: F401

TRACE = "0af7651916cd43dd8448eb211c80319c"


@pytest.fixture
def json_log():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    out = io.StringIO()
    logs.configure(logs.LogSettings("json"), out)
    yield out
    root.handlers[:] = handlers
    root.setLevel(level)


async def test_a_failed_request_is_logged_with_its_ids(sidecar, client, json_log):  # noqa: F811
    url = await sidecar("http://" + dead_host_port())
    headers = {"x-request-id": "rid-42", "traceparent": f"00-{TRACE}-b7ad6b7169203331-01"}
    async with client.post(url + "/v1/completions", json=COMPLETION, headers=headers) as resp:
        assert resp.status == 502
    lines = [json.loads(line) for line in json_log.getvalue().splitlines()]
    failed = [ln for ln in lines if ln["logger"] == "connector" and "local engine" in ln["message"]]
    assert failed and all((ln["request_id"], ln["trace_id"]) == ("rid-42", TRACE) for ln in failed)
    assert COMPLETION["prompt"] not in json_log.getvalue()
