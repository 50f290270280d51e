"""examples/pd as its end-to-end tests drive it (tests/e2e/test_pd.py, the tracing test): the
running stack's pods and /debug/pd decisions, a prompt no pod has seen, a completion with its
request id."""

from __future__ import annotations

import random
import uuid

import requests
import yaml

from infergw.stack.local import LocalStack
from tests.e2e.metrics import Metrics

MODEL = "infergate-sim"
SERVED = "x-gateway-destination-endpoint-served"
PREFILL_LEGS = "infergate_connector_prefill_duration_seconds_count"  # successful prefill legs
FALLBACKS = "infergate_connector_prefill_fallbacks_total"
SUCCESS = "vllm:request_success_total"
THRESHOLD = 64  # examples/pd/epp-config.yaml: nonCachedTokens


def scrape(url: str) -> Metrics:
    r = requests.get(url, timeout=5)
    assert r.status_code == 200, url
    return Metrics(r.text)


class PD:
    """The running example: its pods by role and group, and what they count."""

    def __init__(self, stack: LocalStack) -> None:
        self.stack = stack

    def pods(self) -> list[dict]:
        """Ready pods from the pool file: name, role, group, address (ip:8000), ip."""
        out = []
        for d in yaml.safe_load_all(self.stack.pool_path.read_text()):
            if not d or d["kind"] != "Pod":
                continue
            ready = any(
                c["type"] == "Ready" and c["status"] == "True"
                for c in d["status"].get("conditions", [])
            )
            if ready and d["status"].get("podIP"):
                labels = d["metadata"]["labels"]
                ip = d["status"]["podIP"]
                out.append(
                    {
                        "name": d["metadata"]["name"],
                        "role": labels["infergate.io/role"],
                        "group": labels["infergate.io/group"],
                        "address": f"{ip}:8000",
                        "ip": ip,
                    }
                )
        return out

    def by_role(self, role: str) -> dict[str, dict]:
        """group -> that group's pod of this role."""
        return {p["group"]: p for p in self.pods() if p["role"] == role}

    def connector(self, decode: dict) -> Metrics:
        return scrape(f"http://{decode['address']}/connector/metrics")

    def prefill_legs(self) -> float:
        return sum(self.connector(d)(PREFILL_LEGS) for d in self.by_role("decode").values())

    def prefill_successes(self) -> float:
        return sum(
            scrape(f"http://{p['address']}/metrics")(SUCCESS)
            for p in self.by_role("prefill").values()
        )

    def debug_pd(self) -> dict:
        url = f"http://127.0.0.1:{self.stack.cfg.ports.picker_metrics}/debug/pd"
        return requests.get(url, timeout=5).json()

    def decision(self, request_id: str) -> dict:
        found = [d for d in self.debug_pd()["recent"] if d["request_id"] == request_id]
        assert len(found) == 1, f"no /debug/pd decision for {request_id}"
        return found[0]


SYLLABLES = [f"{a}{b}" for a in "bcdfghklmnprstvz" for b in ("a", "e", "i", "o", "u", "ar")]


def long_prompt(words: int = 300) -> str:
    """A prompt no pod has seen (its first block is new, so every block is): ~1.5 tokens a
    word, far more than nonCachedTokens."""
    tag = uuid.uuid4().hex[:8]
    rng = random.Random(tag)
    return f"Request {tag}: " + " ".join(rng.choice(SYLLABLES) for _ in range(words))


def complete(
    stack: LocalStack, prompt: str, *, max_tokens: int = 8, timeout: float = 30
) -> tuple[requests.Response, str]:
    rid = str(uuid.uuid4())
    r = requests.post(
        stack.url + "/v1/completions",
        json={
            "model": MODEL,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "seed": 11,
        },
        headers={"x-request-id": rid},
        timeout=timeout,
    )
    return r, rid
