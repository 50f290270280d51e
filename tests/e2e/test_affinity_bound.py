"""The prefix scorers' loadBound with real simulator pods: a prompt whose prefix one pod holds
goes there while that pod's in-flight requests are at most `loadBound` above the least loaded
pod's, then spills to another pod, whose speculative entries take the prefix's next requests.

The requests are streams held open (long answers at the simulator's real pace), so the picker's
in-flight counts stand still while the test sends the next one: nothing depends on timing."""

from __future__ import annotations

from contextlib import ExitStack

import pytest
import requests

from tests.e2e.gateway_config import MODEL, PIN, SERVED
from tests.e2e.stack_fixtures import make_stack, wait_held

pytestmark = pytest.mark.slow

# Long answers at the simulator's own pace (~10 ms a token): every stream outlives the test.
SIM = ["--num-gpu-blocks-override", "256", "--block-size", "16"]
ANSWER_TOKENS = 2000
PREFIX = "A popular new system prompt: " + " ".join(f"rule{j}" for j in range(120)) + "\nQ: "


def picker_config(bound: int) -> str:
    return f"""apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: header-based-testing-filter
- type: precise-prefix-cache-scorer
  parameters: {{loadBound: {bound}}}
- type: least-request
  parameters: {{recentSeconds: 0}}
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: header-based-testing-filter
  - {{pluginRef: precise-prefix-cache-scorer, weight: 3}}
  - {{pluginRef: least-request, weight: 2}}
  - pluginRef: max-score-picker
"""


def open_stream(stack, streams: ExitStack, question: str) -> str:
    """Start a long streamed answer and leave it running; the pod that serves it."""
    r = streams.enter_context(
        requests.post(
            stack.url + "/v1/completions",
            json={
                "model": MODEL,
                "prompt": PREFIX + question,
                "max_tokens": ANSWER_TOKENS,
                "stream": True,
            },
            stream=True,
            timeout=60,
        )
    )
    assert r.status_code == 200, r.text
    return r.headers[SERVED]


def test_affinity_yields_to_load_past_the_bound(tmp_path):
    # Without a bound every one would go home (tests/epp/scheduling/test_load_balance.py).
    stack = make_stack(tmp_path, picker_config=picker_config(bound=2), sim_args=SIM)
    try:
        home = stack.pod_addresses[0]
        r = requests.post(
            stack.url + "/v1/completions",
            headers={PIN: home},
            json={"model": MODEL, "prompt": PREFIX + "first?", "max_tokens": 1},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        wait_held(stack, PREFIX + "next?", home)
        with ExitStack() as streams:
            served = [open_stream(stack, streams, f"question {i}?") for i in range(7)]
        # home holds the prefix: it takes requests while it is at most 2 above the others
        # (0, 1 and 2 in flight), then yields; the spill pod got the speculative entries and
        # takes the next while it is within the bound, then the third pod gets one.
        spill, third = served[3], served[6]
        assert served[:3] == [home] * 3
        assert spill != home and served[4:6] == [spill, spill]
        assert third not in (home, spill)
    finally:
        stack.stop()
