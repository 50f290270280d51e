"""Local stacks the e2e tests start, and how they talk to one: `make_stack` (simulator pods behind
a pinnable picker config), `recording_stack` (one pod that records the headers it received) with
`ask` (a request with exactly the given headers), `recorded` and `picker_requests`; what a
picker's KV index says pods hold (`prefix_scores`, `wait_held`)."""

from __future__ import annotations

import http.client
import json
import sys
import time

import requests

from infergw.stack.local import QUICKSTART, LocalStack, StackConfig
from infergw.stack.ports import free_port, free_stack_ports
from tests.e2e.gateway_config import MODEL, pinnable


def make_stack(
    tmp_path, *, pods=3, picker_config: str | None = None, per_pod_kv=False, pickers=1, **kw
) -> LocalStack:
    ports = free_stack_ports(pods, per_pod_kv, pickers)
    if picker_config is None:
        picker_config = pinnable((QUICKSTART / "epp-config.yaml").read_text())
    cfg_path = tmp_path / "epp-config.yaml"
    cfg_path.write_text(picker_config)
    kw.setdefault("sim_args", ["--sim-time-scale", "0.2"])
    return LocalStack(
        StackConfig(
            workdir=tmp_path,
            pods=pods,
            ports=ports,
            pod_ports=[free_port() for _ in range(pods)],
            picker_config=cfg_path,
            pickers=pickers,
            **kw,
        )
    ).start()


def recording_stack(workdir) -> LocalStack:
    """One recording pod behind the picker (ext_proc over verified TLS), failing closed."""
    return LocalStack(
        StackConfig(
            workdir=workdir,
            pods=1,
            ports=free_stack_ports(1),
            pod_ports=[free_port()],
            pod_command=lambda port: [
                sys.executable,
                "-m",
                "tests.e2e.recording_backend",
                str(port),
            ],
        )
    ).start()


class Answer:
    def __init__(self, status: int, text: str) -> None:
        self.status_code, self.text = status, text


def ask(
    stack: LocalStack,
    headers: dict | list[tuple[str, str]] | None = None,
    get: str | None = None,
) -> Answer:
    """POST a completion (or, given a path, GET it: no body) with exactly these headers (a
    list may repeat one, which requests' dicts cannot)."""
    body = json.dumps({"model": "infergate-sim", "prompt": "hi", "max_tokens": 1}).encode()
    items = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
    conn = http.client.HTTPConnection("127.0.0.1", stack.cfg.ports.envoy, timeout=30)
    try:
        if get is not None:
            conn.putrequest("GET", get)
            body = b""
        else:
            conn.putrequest("POST", "/v1/completions")
            items.insert(0, ("content-type", "application/json"))
            items.append(("content-length", str(len(body))))
        for name, value in items:
            conn.putheader(name, value)
        conn.endheaders(body or None)
        resp = conn.getresponse()
        return Answer(resp.status, resp.read().decode(errors="replace"))
    finally:
        conn.close()


def picker_requests(stack: LocalStack) -> float:
    """ext_proc streams the picker was sent: one per request that reached it."""
    url = f"http://127.0.0.1:{stack.cfg.ports.picker_metrics}/metrics"
    for line in requests.get(url, timeout=5).text.splitlines():
        if line.startswith('infergate_epp_extproc_messages_total{kind="request_headers"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def recorded(stack: LocalStack) -> list[dict]:
    (pod,) = stack.pod_addresses
    return requests.get(f"http://{pod}/recorded", timeout=5).json()


def prefix_scores(metrics_port: int, model: str, text: str) -> dict[str, int]:
    """What a picker's index says each pod holds of `text`, in blocks (its
    /debug/prefix-scores page, on the metrics port)."""
    r = requests.post(
        f"http://127.0.0.1:{metrics_port}/debug/prefix-scores",
        json={"model": model, "prompt": text},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    return {e["address"]: e["matched_blocks"] for e in r.json()["endpoints"]}


def wait_held(stack: LocalStack, text: str, address: str, within: float = 10.0) -> None:
    """Until the picker's index says `address` holds the start of `text` (its KV events)."""
    deadline = time.monotonic() + within
    while prefix_scores(stack.cfg.ports.picker_metrics, MODEL, text).get(address, 0) == 0:
        assert time.monotonic() < deadline, f"the index never saw {address} hold the prompt"
        time.sleep(0.1)
