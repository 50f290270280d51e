"""The simulator's log: JSON lines at -vv, the lines of a request naming its id (a hostile one
clipped, and kept inside its field), and neither the prompt nor the completion in any line."""

from __future__ import annotations

import json

import requests

from infergw.api.log_context import MAX_REQUEST_ID
from tests.conftest import free_port, running, simulator_cmd
from tests.paths import TINY_MODEL

PROMPT_MARKER = "SIM-PROMPT-MARKER-5e1a"
# A client's id: quotes that would end a JSON string, and far longer than a line should hold.
HOSTILE_ID = 'bad-1","level":"forged' + "x" * 5000


def test_a_request_lines_name_it_and_never_hold_the_prompt(tmp_path) -> None:
    port = free_port()
    log = tmp_path / "sim.log"
    cmd = simulator_cmd(port, "--model", str(TINY_MODEL), "--served-model-name", "tiny")
    url = f"http://127.0.0.1:{port}"
    with running(
        [*cmd, "--log-format", "json", "-vv", "--sim-time-scale", "0.05"],
        ready_url=f"{url}/health",
        output=log,
    ):
        ok = requests.post(
            f"{url}/v1/completions",
            json={"model": "tiny", "prompt": f"say {PROMPT_MARKER}", "max_tokens": 24},
            timeout=30,
        )
        assert ok.status_code == 200, ok.text
        completion = ok.json()["choices"][0]["text"]
        # A bad request: its error is logged (at info), naming the request.
        bad = requests.post(
            f"{url}/v1/completions",
            json={"model": "tiny", "prompt": f"say {PROMPT_MARKER}", "max_tokens": -1},
            headers={"x-request-id": HOSTILE_ID},
            timeout=30,
        )
        assert bad.status_code == 400, bad.text
    text = log.read_text()
    lines = [json.loads(line) for line in text.splitlines()]  # each line parses: no forgery
    named = [ln for ln in lines if ln.get("request_id", "").startswith(HOSTILE_ID[:40])]
    assert any("-> 400" in ln["message"] for ln in named), lines
    assert all(len(ln["request_id"]) <= MAX_REQUEST_ID + 1 for ln in named)
    assert not any(ln["level"] == "forged" for ln in lines)
    assert PROMPT_MARKER not in text
    assert len(completion) > 20 and completion not in text
