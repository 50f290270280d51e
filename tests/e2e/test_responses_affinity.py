"""Responses API affinity through the gateway, as the official `openai` client uses it: two
simulator pods (each storing its own responses, 404 for an id it does not hold, as vLLM) behind
two picker replicas and real Envoy. A chain of `previous_response_id` calls, retrieve, cancel
and delete each reach the pod that stored the response, whichever picker takes them; an edited
id and a pod gone from the pool are clear 404s, never another pod's answer."""

from __future__ import annotations

import http.client
import json
import time
import urllib.parse
from collections import Counter

import openai
import pytest
import requests
import yaml

from infergw.api.names import SERVED_HEADER
from infergw.epp.response_ids import PREFIX
from tests.e2e.stack_fixtures import make_stack

pytestmark = pytest.mark.slow
MODEL = "infergate-sim"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = make_stack(tmp_path_factory.mktemp("responses"), pods=2, pickers=2)
    yield s
    s.stop()


@pytest.fixture
def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.url + "/v1", api_key="unused", max_retries=0)


def streams_taken(stack) -> list[float]:
    """How many requests each picker has taken (its ext_proc streams' request headers)."""
    series = 'infergate_epp_extproc_messages_total{kind="request_headers"}'
    counts = []
    for i in stack.picker_indexes:
        page = requests.get(f"http://127.0.0.1:{stack.picker_ports(i).metrics}/metrics", timeout=5)
        line = next(x for x in page.text.splitlines() if x.startswith(series + " "))
        counts.append(float(line.rsplit(" ", 1)[1]))
    return counts


def create(client, **kw):
    raw = client.responses.with_raw_response.create(model=MODEL, max_output_tokens=3, **kw)
    return raw.parse(), raw.headers[SERVED_HEADER]


def test_a_chain_of_responses_stays_on_the_pod_that_stored_it(client, stack):
    before = streams_taken(stack)
    first, pod = create(client, input="Tell me a story.")
    assert first.id.startswith(PREFIX), first.id
    previous, answers = first, []
    for turn in range(8):  # half of them would land on the other pod, which 404s
        asked = f"And then? ({turn})"
        answer, served = create(client, input=asked, previous_response_id=previous.id)
        assert served == pod and answer.previous_response_id == previous.id
        assert answer.output_text and answer.id.startswith(PREFIX)
        answers.append(answer)
        previous = answer
    # Both pickers took turns of it, and sent each to that pod.
    after = streams_taken(stack)
    assert len(before) == 2 and all(a > b for a, b in zip(after, before, strict=True))
    # The conversation grows on that pod: each turn's prompt holds the ones before it.
    assert answers[-1].usage.input_tokens > answers[0].usage.input_tokens > first.usage.input_tokens


def test_a_streamed_responses_ids_name_its_pod_too(client):
    raw = client.responses.with_raw_response.create(
        model=MODEL, input="Stream it.", max_output_tokens=3, stream=True
    )
    pod, events = raw.headers[SERVED_HEADER], list(raw.parse())
    ids = {
        e.response.id for e in events if e.type.startswith("response.") and hasattr(e, "response")
    }
    (made,) = ids  # created, in progress and completed: one id, stamped in every event
    assert made.startswith(PREFIX)
    for _ in range(4):
        answer, served = create(client, input="and?", previous_response_id=made)
        assert served == pod and answer.previous_response_id == made


def test_retrieve_cancel_and_delete_reach_the_storing_pod(client, stack):
    made, pod = create(client, input="Remember this.")
    for _ in range(6):  # spread over both pickers
        raw = client.responses.with_raw_response.retrieve(made.id)
        assert raw.headers[SERVED_HEADER] == pod
        assert raw.parse().id == made.id and raw.parse().output_text == made.output_text
    # vLLM cancels background responses only: this one's pod says so (another would 404).
    with pytest.raises(openai.BadRequestError, match="Cannot cancel a synchronous response"):
        client.responses.cancel(made.id)
    # vLLM serves no DELETE: the storing pod answers 405 (another pod would too, but the
    # gateway must not pick one at random: the served header says which answered).
    for _ in range(4):
        r = requests.delete(f"{stack.url}/v1/responses/{made.id}", timeout=30)
        assert r.status_code == 405 and r.headers[SERVED_HEADER] == pod


def test_unstored_responses_keep_the_engines_id(client):
    answer, _ = create(client, input="Forget this.", store=False)
    assert answer.id.startswith("resp_") and not answer.id.startswith(PREFIX)
    # An engine's own id is routed as before: a pod that does not hold it says 404.
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(answer.id)


def test_edited_and_huge_ids_are_404_from_the_gateway(client, stack):
    made, _ = create(client, input="hi")
    edited = made.id[:-4] + ("0000" if not made.id.endswith("0000") else "1111")
    for bad in (edited, PREFIX + "A" * 4000):
        with pytest.raises(openai.NotFoundError) as info:
            create(client, input="again", previous_response_id=bad)
        assert info.value.body["code"] == "response_not_found"
        r = requests.get(f"{stack.url}/v1/responses/{bad}", timeout=30)
        assert r.status_code == 404 and r.json()["error"]["code"] == "response_not_found"


def test_a_pod_gone_from_the_pool_is_a_clear_404(client, stack):
    made, pod = create(client, input="Remember this too.")
    port = int(pod.rsplit(":", 1)[1])
    docs = list(yaml.safe_load_all(stack.pool_path.read_text()))
    pool = next(d for d in docs if d and d.get("kind") == "InferencePool")
    pool["spec"]["targetPorts"] = [p for p in pool["spec"]["targetPorts"] if p["number"] != port]
    stack.pool_path.write_text(yaml.safe_dump_all(docs))  # the pickers reload it
    deadline, seen = time.monotonic() + 20, Counter()
    while seen["gone"] < 6:  # both pickers, a few times each
        try:
            create(client, input="and?", previous_response_id=made.id)
            seen["answered"] += 1
        except openai.NotFoundError as exc:
            assert exc.body["code"] == "response_not_found"
            assert "has left the pool" in exc.body["message"]
            seen["gone"] += 1
        assert time.monotonic() < deadline, f"the pickers never saw the pod go: {seen}"
    # Six refusals may all have come from one picker while the other still reloads the pool
    # file: the read is 404 once both have (until then the pod, still running, answers it).
    while (r := requests.get(f"{stack.url}/v1/responses/{made.id}", timeout=30)).status_code != 404:
        assert r.status_code == 200 and time.monotonic() < deadline, (r.status_code, r.text)
        time.sleep(0.1)
    assert "has left the pool" in r.json()["error"]["message"]


def raw_get(url: str, method: str, path: str) -> tuple[int, dict, bytes]:
    """`path` sent byte for byte (requests and urllib3 resolve dot segments first)."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request(method, path)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def test_odd_paths_to_a_stored_response_reach_its_pod_or_are_a_4xx(client, stack):
    """Through real Envoy: dot segments, encoded slashes and dots, query strings and doubled
    slashes around one of our ids. Whatever Envoy makes of the path, the answer is the storing
    pod's or a 4xx with an OpenAI-style error: never a 5xx, never another pod's."""
    made, pod = create(client, input="Keep this.")
    rid = made.id
    paths = [
        f"/v1/responses/{rid}?include[]=x&stream=false",
        f"/v1/responses/{rid}/../{rid}",
        f"/v1/responses/./{rid}",
        f"/v1/responses/{rid}%2F..%2F..%2Fmetrics",
        f"/v1/responses/%2e%2e/{rid}",
        f"/v1/responses//{rid}",
        f"/v1/responses/{rid}/input_items/../../../../metrics",
        f"/v1/responses/{rid}%00",
        f"/v1/responses/{rid}/cancel?x=%0d%0a",
        f"/v1/responses/{rid[:-1]}%{rid[-1]}",
    ]
    for path in paths:
        for method in ("GET", "DELETE"):
            status, headers, body = raw_get(stack.url, method, path)
            assert status < 500, (method, path, status, body[:300])
            if status < 300 or headers.get(SERVED_HEADER):
                assert headers.get(SERVED_HEADER) == pod, (method, path, status)
            else:
                error = json.loads(body)["error"]
                assert error["message"] and 400 <= status < 500, (method, path, body[:300])
