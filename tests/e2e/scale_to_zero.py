"""Helpers for scale-from-zero tests: a simulator Model with `minReplicas: 0` behind two
pickers in the local stack, waiting for it to reach zero, and a cold streamed request."""

from __future__ import annotations

import time
from pathlib import Path

import requests
import yaml

from infergw.stack.local import LocalStack, StackConfig
from infergw.stack.pods import pool_pods
from infergw.stack.ports import free_stack_ports
from tests.e2e.standalone_helpers import sim_model
from tests.paths import DEFAULT_MODEL

WINDOW = 4  # the scale-down stabilization window, seconds: idle this long → zero
INTERVAL = 5  # the autoscaler's cycle; at zero it looks every second (AT_ZERO_INTERVAL)
TTL = 25  # the picker's --capacity-wait-ttl: a simulator pod starts well within it
COLD = 6  # concurrent cold requests
PICKERS = 2  # each holds what Envoy gives it; the autoscaler sums their demand


def manifests() -> list[dict]:
    """A simulator Model that goes to zero pods when idle, and its AutoScalingPolicy."""
    policy = {
        "apiVersion": "workload.infergate.io/v1alpha1",
        "kind": "AutoScalingPolicy",
        "metadata": {"name": "to-zero", "namespace": "default"},
        "spec": {
            "metrics": [{"metricName": "vllm:num_requests_waiting", "targetValue": 4}],
            "behavior": {
                "scaleUp": {"stablePolicy": {"stabilizationWindow": "0s", "period": "1s"}},
                "scaleDown": {
                    "percent": 100,
                    "period": "1s",
                    "stabilizationWindow": f"{WINDOW}s",
                },
            },
        },
    }
    model = sim_model(
        backend={"aggregated": {"replicas": 1}},
        engine_args=["--sim-time-scale=0.2"],
        autoscaling={"minReplicas": 0, "maxReplicas": 2, "policyRef": {"name": "to-zero"}},
    )
    return [policy, model]


def wait_for_zero(stack: LocalStack, within: float = WINDOW + 30) -> None:
    deadline = time.monotonic() + within
    while pool_pods(stack.pool_path, "tiny") or any(
        stack.picker_endpoints(i) for i in range(PICKERS)
    ):
        assert time.monotonic() < deadline, "the Model never went to zero pods"
        time.sleep(0.2)


def cold_request(stack: LocalStack, n: int) -> tuple[int, float | None, float, str, dict[str, str]]:
    """(status, seconds to the first streamed token, seconds in all, body, headers)."""
    body = {"model": "tiny", "prompt": f"cold {n}", "max_tokens": 8, "stream": True}
    t0 = time.monotonic()
    first = None
    text = []
    with requests.post(
        stack.url + "/v1/completions", json=body, stream=True, timeout=TTL + 30
    ) as r:
        for line in r.iter_lines():
            if first is None and line.startswith(b"data: {"):
                first = time.monotonic() - t0
            text.append(line.decode(errors="replace"))
        return r.status_code, first, time.monotonic() - t0, "\n".join(text), dict(r.headers)


def zero_stack(tmp_path: Path, **config) -> LocalStack:
    """The stack (not started) on that Model, its autoscaler on a short cycle."""
    directory = tmp_path / "manifests"
    directory.mkdir()
    (directory / "model.yaml").write_text(yaml.safe_dump_all(manifests()))
    (tmp_path / "stack").mkdir()
    return LocalStack(
        StackConfig(
            workdir=tmp_path / "stack",
            ports=free_stack_ports(1, pickers=PICKERS),
            pickers=PICKERS,
            manifests=directory,
            pool_name="tiny",
            served_model_name="tiny",
            tokenizer_dir=DEFAULT_MODEL,
            expect_pods=0,  # it may already be on its way to zero
            controllers_args=["--autoscale-interval", str(INTERVAL)],
            picker_args=["--capacity-wait-ttl", f"{TTL}s"],
            **config,
        )
    )
