"""The endpoint-picker protocol, with this test playing Envoy against a real picker process."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import grpc
import pytest
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2 as pm

from infergw.cluster import certs
from tests import extproc_client as ec
from tests import picker_fixtures
from tests.conftest import free_port
from tests.picker_fixtures import COMPLETION, GET, PORT_TAKEN, Picker
from tests.waiting import wait_for_async

STORED = "/v1/responses/resp_1"  # a read without a body that goes to a pod


async def test_destination_in_header_and_metadata_alike(picker):
    out = await ec.exchange(picker.target, [ec.headers(), ec.body(COMPLETION)])
    first = out[0]
    assert first.WhichOneof("response") == "request_headers"
    assert first.request_headers.response.clear_route_cache
    dest = ec.set_headers(first)["x-gateway-destination-endpoint"]
    meta = ec.lb_metadata(first)["envoy.lb"]["x-gateway-destination-endpoint"]
    assert dest == meta
    targets = dest.split(",")
    # primary + one fallback (the default), distinct, all from the pool
    assert len(targets) == 2 and len(set(targets)) == 2
    assert set(targets) <= set(picker.addresses)
    assert ec.set_headers(first)["content-length"] == str(len(json.dumps(COMPLETION)))


async def test_a_client_named_prefiller_is_removed(picker):
    # Only the picker may name a prefill pod for the decode sidecar.
    out = await ec.exchange(picker.target, [ec.headers(), ec.body(COMPLETION)])
    removed = out[0].request_headers.response.header_mutation.remove_headers
    assert "x-prefiller-host-port" in removed


async def test_body_is_echoed_in_chunks_of_at_most_62000_bytes(picker):
    big = {**COMPLETION, "prompt": "x" * 150_000}
    raw = json.dumps(big).encode()
    # Envoy may deliver the body in pieces; the picker waits for the end of stream.
    parts = [raw[i : i + 40_000] for i in range(0, len(raw), 40_000)]
    msgs = [ec.headers(), *[ec.body(p, eos=(i == len(parts) - 1)) for i, p in enumerate(parts)]]
    out = await ec.exchange(picker.target, msgs)
    chunks = ec.streamed_bodies(out)
    assert [len(c) for c, _ in chunks] == [62_000, 62_000, len(raw) - 124_000]
    assert [eos for _, eos in chunks] == [False, False, True]
    assert b"".join(c for c, _ in chunks) == raw
    assert out[0].WhichOneof("response") == "request_headers"  # headers answered first


async def test_request_without_body_is_answered_at_once(picker):
    out = await ec.exchange(picker.target, [ec.headers(STORED, eos=True, extra=GET)])
    assert len(out) == 1
    dest = ec.set_headers(out[0])["x-gateway-destination-endpoint"]
    assert set(dest.split(",")) <= set(picker.addresses)


async def test_the_picker_lists_the_pools_models_itself(picker):
    deadline = time.monotonic() + 10
    while any(e["models"] is None for e in picker.debug()["endpoints"]):
        assert time.monotonic() < deadline, "the picker never learned the served models"
        await asyncio.sleep(0.05)
    out = await ec.exchange(picker.target, [ec.headers("/v1/models?x=1", eos=True, extra=GET)])
    status, body = ec.immediate(out)
    assert status == 200 and body["object"] == "list"
    assert body["data"] == [
        {"id": "infergate-sim", "object": "model", "created": 0, "owned_by": "default"}
    ]
    out = await ec.exchange(
        picker.target, [ec.headers("/v1/models/infergate-sim", eos=True, extra=GET)]
    )
    assert ec.immediate(out) == (200, body["data"][0])
    out = await ec.exchange(picker.target, [ec.headers("/v1/models/nope", eos=True, extra=GET)])
    status, body = ec.immediate(out)
    assert status == 404 and body["error"]["code"] == "model_not_found"


async def test_duplicate_end_of_stream_is_ignored(picker):
    out = await ec.exchange(
        picker.target, [ec.headers(), ec.body(COMPLETION), ec.body(b"", eos=True)]
    )
    kinds = [r.WhichOneof("response") for r in out]
    assert kinds == ["request_headers", "request_body"]


@pytest.mark.parametrize("subset", [None, "list", "comma"])
async def test_subset_hint_restricts_candidates(picker, subset):
    chosen = picker.addresses[1]
    hint = None if subset is None else ([chosen] if subset == "list" else f"{chosen}, ")
    out = await ec.exchange(picker.target, [ec.headers(subset=hint), ec.body(COMPLETION)])
    dest = ec.set_headers(out[0])["x-gateway-destination-endpoint"]
    if subset is None:
        assert len(dest.split(",")) == 2
    else:
        assert dest == chosen


@pytest.mark.parametrize("hint", [[], ["10.9.9.9:8000"]])
async def test_empty_or_unusable_subset_is_503(picker, hint):
    out = await ec.exchange(picker.target, [ec.headers(subset=hint), ec.body(COMPLETION)])
    status, body = ec.immediate(out)
    assert status == 503 and body["error"]["code"] == 503


@pytest.mark.parametrize(
    "path,raw,status",
    [
        ("/v1/completions", b"{not json", 400),
        ("/v1/completions", b'["a"]', 400),
        ("/v1/completions", json.dumps({"prompt": "no model"}).encode(), 400),
        ("/v1/chat/completions", json.dumps({"model": "m", "messages": "x"}).encode(), 400),
        ("/v1/completions", json.dumps({**COMPLETION, "stream": "yes"}).encode(), 400),
        ("/v1/unknown-api", json.dumps(COMPLETION).encode(), 404),
        # Each of these was a 500 (issue 12): a lone surrogate, a 5000-digit integer, a
        # prompt nested 100,000 deep, a negative or 400-digit max_tokens.
        ("/v1/completions", b'{"model":"m","prompt":"\\ud800"}', 400),
        ("/v1/completions", b'{"model":"m","prompt":"x","seed":' + b"1" * 5000 + b"}", 400),
        (
            "/v1/completions",
            b'{"model":"m","prompt":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
            400,
        ),
        ("/v1/completions", b'{"model":"m","prompt":"x","max_tokens":-1}', 400),
        ("/v1/completions", b'{"model":"m","prompt":"x","max_tokens":' + b"9" * 400 + b"}", 400),
    ],
)
async def test_bad_requests_get_immediate_errors(picker, path, raw, status):
    out = await ec.exchange(picker.target, [ec.headers(path), ec.body(raw)])
    got, body = ec.immediate(out)
    assert got == status
    assert body["error"]["code"] == status and body["error"]["message"].startswith(
        "inference error:"
    )


async def test_no_endpoint_left_after_filters_is_429(picker):
    out = await ec.exchange(
        picker.target,
        [ec.headers(extra={"test-epp-endpoint-selection": "10.1.2.3"}), ec.body(COMPLETION)],
    )
    assert ec.immediate(out)[0] == 429


async def test_header_filter_pins_the_endpoint(picker):
    pinned = picker.addresses[2]
    out = await ec.exchange(
        picker.target,
        [ec.headers(extra={"test-epp-endpoint-selection": pinned}), ec.body(COMPLETION)],
    )
    assert ec.set_headers(out[0])["x-gateway-destination-endpoint"] == pinned


async def test_response_phase_adds_served_header_and_reads_usage(picker):
    served = picker.addresses[0]
    sse = (
        b'data: {"choices":[{"text":"a"}]}\n\ndata: {"choices":[],"usage":{"prompt_tokens":'
        b'7,"completion_tokens":3,"total_tokens":10,"prompt_tokens_details":'
        b'{"cached_tokens":4}}}\n\ndata: [DONE]\n\n'
    )
    before = picker.metric_lines("inference_objective_output_tokens_sum")
    msgs = [
        ec.headers(),
        ec.body({**COMPLETION, "stream": True}),
        ec.response_headers(content_type="text/event-stream", served=served),
        # a usage line cut in two by the chunking must still be read
        ec.response_body(sse[:60], False),
        ec.response_body(sse[60:], False),
        ec.response_body(b"", True),
    ]
    out = await ec.exchange(picker.target, msgs)
    resp_headers = next(r for r in out if r.WhichOneof("response") == "response_headers")
    assert ec.set_headers(resp_headers, "response_headers") == {
        "x-gateway-destination-endpoint-served": served
    }
    echoed = ec.streamed_bodies(out, "response_body")
    assert b"".join(c for c, _ in echoed) == sse and echoed[-1][1] is True
    after = picker.metric_lines("inference_objective_output_tokens_sum")
    assert after != before and float(after[0].rsplit(" ", 1)[1]) >= 3


def _cancelled(picker) -> float:
    lines = picker.metric_lines('inference_objective_request_error_total{error_code="cancelled"')
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines)


@pytest.mark.parametrize(
    ("announced", "counts_as_cancelled"),
    [
        (pm.ProcessingMode.FULL_DUPLEX_STREAMED, True),  # the body was to pass here: left
        (pm.ProcessingMode.NONE, False),  # the body never passes here: delivered
        (None, False),  # the proxy does not say: as if delivered
    ],
)
async def test_inflight_counts_rise_and_fall_including_cancelled(
    picker, announced, counts_as_cancelled
):
    pinned = picker.addresses[1]

    def inflight():
        return next(
            e["inflight_requests"] for e in picker.debug()["endpoints"] if e["address"] == pinned
        )

    assert inflight() == 0
    before = _cancelled(picker)
    # A stream that ends after the response headers, before the answer's end.
    await ec.exchange(
        picker.target,
        [
            ec.headers(extra={"test-epp-endpoint-selection": pinned}, response_body_mode=announced),
            ec.body(COMPLETION),
            ec.response_headers(served=pinned),
        ],
    )
    await wait_for_async(lambda: inflight() == 0, "the request's end")
    assert _cancelled(picker) == before + (1 if counts_as_cancelled else 0)


async def test_tls_is_on_by_default(sims, tmp_path):
    cert, key = certs.self_signed("localhost")
    (tmp_path / "tls.crt").write_bytes(cert)
    (tmp_path / "tls.key").write_bytes(key)
    p = Picker(tmp_path, sims, secure=True, extra=["--cert-path", str(tmp_path)])
    with p.run():
        creds = grpc.ssl_channel_credentials(root_certificates=cert)
        out = await ec.exchange(
            p.target,
            [ec.headers(), ec.body(COMPLETION)],
            credentials=creds,
            options=(("grpc.ssl_target_name_override", "localhost"),),
        )
        assert "x-gateway-destination-endpoint" in ec.set_headers(out[0])
        with pytest.raises(grpc.aio.AioRpcError):
            await ec.exchange(p.target, [ec.headers(), ec.body(COMPLETION)])


async def test_a_picker_whose_port_was_taken_meanwhile_starts_on_others(
    sims, tmp_path, monkeypatch
):
    """The harness (tests/picker_fixtures.py): a port found free can be taken before the picker
    binds it (by any process's outgoing connection, under load most of all); the picker then
    exits at start and is started again on other ports, instead of failing the test."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        p = Picker(tmp_path, sims)
        handed = [port]  # the next port free_port finds: the taken one
        monkeypatch.setattr(
            picker_fixtures, "free_port", lambda: handed.pop() if handed else free_port()
        )
        p._choose_ports()
        assert p.grpc == port
        with p.run():
            assert p.grpc != port
            out = await ec.exchange(p.target, [ec.headers(), ec.body(COMPLETION)])
            assert "x-gateway-destination-endpoint" in ec.set_headers(out[0])
    assert PORT_TAKEN in (tmp_path / f"picker-{port}.log").read_text().lower()


async def test_no_ready_pods_gives_503_with_or_without_a_body(sims, tmp_path):
    p = Picker(tmp_path, sims, ready=False, extra=["--capacity-wait-ttl", "300ms"])
    with p.run():
        out = await ec.exchange(p.target, [ec.headers(), ec.body(COMPLETION)])
        # held for a pod (scale from zero) for the TTL, then 503 with Retry-After
        assert ec.immediate(out)[0] == 503
        answer = next(r.immediate_response for r in out if r.HasField("immediate_response"))
        sent = {h.header.key: h.header.raw_value for h in answer.headers.set_headers}
        assert int(sent["retry-after"]) >= 1
        out = await ec.exchange(p.target, [ec.headers(STORED, eos=True, extra=GET)])
        assert ec.immediate(out)[0] == 503


async def test_fallbacks_are_configurable(sims, tmp_path):
    p = Picker(tmp_path, sims, extra=["--fallback-endpoints", "2"])
    with p.run():
        out = await ec.exchange(p.target, [ec.headers(), ec.body(COMPLETION)])
        assert len(ec.set_headers(out[0])["x-gateway-destination-endpoint"].split(",")) == 3
    p0 = Picker(tmp_path, sims, extra=["--fallback-endpoints", "0"])
    with p0.run():
        out = await ec.exchange(p0.target, [ec.headers(), ec.body(COMPLETION)])
        assert "," not in ec.set_headers(out[0])["x-gateway-destination-endpoint"]


async def test_unknown_model_is_404_once_the_pools_models_are_known(picker):
    deadline = time.monotonic() + 10
    while any(e["models"] is None for e in picker.debug()["endpoints"]):
        assert time.monotonic() < deadline, "the picker never learned the served models"
        await asyncio.sleep(0.05)
    out = await ec.exchange(
        picker.target, [ec.headers(), ec.body({**COMPLETION, "model": "gpt-nope"})]
    )
    status, body = ec.immediate(out)
    assert status == 404 and "gpt-nope" in body["error"]["message"]
    out = await ec.exchange(picker.target, [ec.headers(), ec.body(COMPLETION)])
    assert ec.immediate(out) is None


async def test_a_stream_without_response_headers_ends_answered_when_the_proxy_skips_them(
    sims, tmp_path
):
    """Envoy with response_header_mode SKIP closes the stream when the answer ends: with
    --response-headers-skipped that is an answered request (its duration counted, status
    unknown); without, the same stream is a request cancelled before its answer."""
    for skipped in (False, True):
        workdir = tmp_path / f"skipped-{skipped}"
        workdir.mkdir()
        p = Picker(workdir, sims, extra=["--response-headers-skipped"] if skipped else [])
        with p.run():
            await ec.exchange(p.target, [ec.headers(), ec.body(COMPLETION)])
            await asyncio.sleep(0.1)

            def total(prefix: str, picker: Picker = p) -> float:
                return sum(float(line.rsplit(" ", 1)[1]) for line in picker.metric_lines(prefix))

            cancelled = total('inference_objective_request_error_total{error_code="cancelled"')
            answered = total("inference_objective_request_duration_seconds_count")
            assert (cancelled, answered) == ((0, 1) if skipped else (1, 0))
            assert all(e["inflight_requests"] == 0 for e in p.debug()["endpoints"])
