"""The picker's log lines, with this test playing Envoy against a real picker process at -vv:
the lines written while it handles a request carry the request's id and trace id (from its
x-request-id and traceparent headers), every JSON line parses, and no prompt or completion
reaches the log in either format — only sizes and token counts."""

from __future__ import annotations

import json

import pytest

from tests import extproc_client as ec
from tests.picker_fixtures import COMPLETION, Picker

MARKER = "PROMPT-MARKER-7f3a9c"
ANSWER_MARKER = "COMPLETION-MARKER-51be02"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE}-00f067aa0ba902b7-01"


def _headers(request_id: str, path: str = "/v1/completions"):
    return ec.headers(path, extra={"x-request-id": request_id, "traceparent": TRACEPARENT})


async def _requests(picker: Picker) -> None:
    """A completion answered in full, a chat request, one refused (400), each with markers."""
    answer = json.dumps(
        {
            "choices": [{"text": ANSWER_MARKER}],
            "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
        }
    ).encode()
    await ec.exchange(
        picker.target,
        [
            _headers("req-answered"),
            ec.body({**COMPLETION, "prompt": f"say {MARKER} please"}),
            ec.response_headers(served=picker.addresses[0]),
            ec.response_body(answer, True),
        ],
    )
    chat = {
        "model": "infergate-sim",
        "messages": [{"role": "user", "content": f"{MARKER}\nline two"}],
        "max_tokens": 2,
    }
    await ec.exchange(picker.target, [_headers("req-chat", "/v1/chat/completions"), ec.body(chat)])
    refused = {**COMPLETION, "prompt": MARKER, "max_tokens": -1}
    out = await ec.exchange(picker.target, [_headers("req-refused"), ec.body(refused)])
    assert ec.immediate(out)[0] == 400


@pytest.mark.parametrize("fmt", ["json", "text"])
async def test_request_lines_carry_the_ids_and_never_the_prompt(sims, tmp_path, fmt):
    picker = Picker(tmp_path, sims, extra=("-vv", "--log-format", fmt))
    with picker.run():
        await _requests(picker)
        info = picker.metric_lines("inference_extension_info")
    log = "".join(p.read_text(errors="replace") for p in tmp_path.glob("picker-*.log"))
    assert MARKER not in log and ANSWER_MARKER not in log
    assert info and 'commit="unknown"' not in info[0]
    if fmt == "json":
        lines = [json.loads(line) for line in log.splitlines()]  # every line parses
        by_request = {}
        for line in lines:
            if "request_id" in line:
                by_request.setdefault(line["request_id"], []).append(line)
                assert line["trace_id"] == TRACE
        picked = [ln for ln in by_request["req-answered"] if "request_bytes" in ln]
        answered = [ln for ln in by_request["req-answered"] if "completion_tokens" in ln]
        assert picked and answered[0]["completion_tokens"] == 3
        assert by_request["req-chat"]
        assert any("-> 400" in ln["message"] for ln in by_request["req-refused"])
    else:
        ids = f"request_id=req-refused trace_id={TRACE}"
        assert any("-> 400" in ln and ids in ln for ln in log.splitlines())
        assert any(
            "request_id=req-answered" in ln and "completion_tokens=3" in ln
            for ln in log.splitlines()
        )
