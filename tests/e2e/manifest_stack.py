"""Helpers for tests of the stack started from a Model manifest (`infergate up DIR`): the
quickstart Model with the replicas asked for, a completion through Envoy (pinned to a pod if
asked), what a picker's KV index says each pod holds, and a polling wait."""

from __future__ import annotations

import time
from pathlib import Path

import requests
import yaml

from infergw.stack.example import Example
from infergw.stack.local import QUICKSTART, LocalStack
from tests.e2e.gateway_config import PIN, pinnable


def write_example(directory: Path, replicas: int, **engine) -> Example:
    """The quickstart Model with the replicas asked for. Its KV events go where the stack
    tells the controllers: this test's picker."""
    directory.mkdir(exist_ok=True)
    model = next(d for d in yaml.safe_load_all((QUICKSTART / "model.yaml").read_text()) if d)
    model["spec"]["replicas"] = replicas
    model["spec"]["engine"]["args"] = ["--sim-time-scale=0.2"]
    model["spec"]["engine"].update(engine)
    (directory / "model.yaml").write_text(yaml.safe_dump(model))
    (directory / "epp-config.yaml").write_text(
        pinnable((QUICKSTART / "epp-config.yaml").read_text())
    )
    return Example.read(directory)


def ask(stack: LocalStack, prompt: str, pin: str | None = None) -> requests.Response:
    r = requests.post(
        stack.url + "/v1/completions",
        headers={PIN: pin} if pin else {},
        json={"model": "infergate-sim", "prompt": prompt, "max_tokens": 2},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    return r


def wait(check, what: str, within: float = 60.0):
    deadline = time.monotonic() + within
    while not (result := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return result


def matched_blocks(stack: LocalStack, index: int, prompt: str) -> dict[str, int]:
    """What picker `index`'s KV index says each pod holds of the prompt."""
    url = f"http://127.0.0.1:{stack.picker_ports(index).metrics}/debug/prefix-scores"
    body = {"model": "infergate-sim", "prompt": prompt}
    r = requests.post(url, json=body, timeout=30)
    assert r.status_code == 200, r.text
    return {e["address"]: e["matched_blocks"] for e in r.json()["endpoints"]}


def indexed_on_it_alone(stack: LocalStack, prompt: str, served: str, pickers: int) -> None:
    """Every picker's KV index comes to hold the prompt's blocks on the pod that served it,
    and on no other pod (each picker heard that pod's KV events)."""
    for index in range(pickers):
        held = wait(
            lambda i=index: (m := matched_blocks(stack, i, prompt))[served] > 0 and m,
            f"picker {index} to index the served pod's blocks",
            within=10,
        )
        assert all(n == 0 for pod, n in held.items() if pod != served), held
