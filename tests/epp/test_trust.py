"""What the picker believes (issue 12, "Headers and routing trust"): client-set objective,
fairness id and model rewrite are ignored unless trusted, the verified user maps to them;
body-less requests reach a pod only on the inference API's read paths; the debug pages are
opt-in, bounded and tokenize off the event loop. Real Director, Datastore, HTTP server and,
for the ext_proc stream and start-up checks, real picker processes."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest
from aiohttp.test_utils import TestClient, TestServer

from infergw.api.names import FAIRNESS_ID_HEADER, MODEL_REWRITE_HEADER, OBJECTIVE_HEADER
from infergw.api.names import USER_HEADER as USER
from infergw.epp.director import Director, DirectorOptions
from infergw.epp.errors import PickerError
from infergw.epp.http_server import DEBUG_BODY_LIMIT, make_app
from infergw.epp.kv_events import KVCacheView, KVEventOptions
from infergw.epp.metrics import PickerMetrics
from infergw.epp.scheduling.config import load_config
from infergw.epp.scheduling.handle import Handle
from infergw.epp.trust import DEFAULT_FAIRNESS_ID, HeaderTrust, Users, UsersConfigError
from infergw.stack.local import DEFAULT_MODEL_DIR
from tests import extproc_client as ec
from tests.director_fixtures import (
    A0,
    A1,
    B0,
    B1,
    LEAST_REQUEST,
    context,
    make_datastore,
    set_models,
    status_of,
)
from tests.picker_fixtures import GET

NET = "networking.infergate.io/v1alpha1"
CLAIMS = {OBJECTIVE_HEADER: "vip", FAIRNESS_ID_HEADER: "someone-else"}


def director(trust: HeaderTrust | None = None, routes=(), servers=()) -> Director:
    ds = make_datastore()
    ds.set_routes(list(routes), list(servers))
    options = DirectorOptions(fallbacks=0, trust=trust or HeaderTrust())
    return Director(ds, load_config(LEAST_REQUEST), PickerMetrics(), options)


# ---- x-gateway-model-name-rewrite -----------------------------------------------------------

SECRET_SERVER = {
    "apiVersion": NET,
    "kind": "ModelServer",
    "metadata": {"name": "secret"},
    "spec": {
        "model": "secret-engine",
        "inferenceEngine": "vLLM",
        "workloadSelector": {"matchLabels": {"app": "vllm"}},
        "workloadPort": {"port": 8001},
    },
}
SECRET_ROUTE = {
    "apiVersion": NET,
    "kind": "ModelRoute",
    "metadata": {"name": "secret"},
    "spec": {
        "modelName": "secret",
        "rules": [
            {
                "modelMatch": {"headers": {"x-team": {"exact": "red"}}},
                "targetModels": [{"modelServerName": "secret"}],
            }
        ],
    },
}


def routed_pool(trust: HeaderTrust | None = None) -> Director:
    """Pods :8001 run the routed model's engine (only team red may use it); :8000 serve m."""
    d = director(trust, [SECRET_ROUTE], [SECRET_SERVER])
    set_models(d, {A0: {"m"}, B0: {"m"}, A1: {"secret-engine"}, B1: {"secret-engine"}})
    return d


async def test_a_clients_rewrite_header_cannot_reach_a_routed_models_pods():
    d = routed_pool()
    for _ in range(20):
        ctx = context(model="m", headers={MODEL_REWRITE_HEADER: "secret-engine"})
        (target,) = await d.handle(ctx)
        assert target.address in (A0, B0)
        assert ctx.target_model == "m" and json.loads(ctx.upstream_body())["model"] == "m"
        assert MODEL_REWRITE_HEADER not in ctx.match_headers  # nor can a route rule match on it


async def test_a_trusted_rewrite_header_still_rewrites():
    d = routed_pool(HeaderTrust(model_rewrite_header=True))
    ctx = context(model="m", headers={MODEL_REWRITE_HEADER: "secret-engine"})
    (target,) = await d.handle(ctx)
    assert target.address in (A1, B1)
    assert json.loads(ctx.upstream_body())["model"] == "secret-engine"


# ---- objective and fairness id --------------------------------------------------------------


async def test_client_claims_of_objective_and_fairness_are_ignored_by_default():
    d = director()
    ctx = context(headers=dict(CLAIMS))
    await d.handle(ctx)
    assert ctx.objective is None and ctx.fairness_id == DEFAULT_FAIRNESS_ID
    assert ctx.match_headers.get(OBJECTIVE_HEADER) is None
    assert ctx.match_headers[FAIRNESS_ID_HEADER] == DEFAULT_FAIRNESS_ID


async def test_the_verified_user_maps_to_objective_and_fairness_id():
    users = Users.from_config(
        {"users": {"alice": {"objective": "vip", "fairnessId": "team-a"}, "bob": {}}}
    )
    d = director(HeaderTrust(users=users))
    alice = context(headers={USER: "alice", OBJECTIVE_HEADER: "batch"})
    await d.handle(alice)
    assert (alice.objective, alice.fairness_id) == ("vip", "team-a")
    bob = context(headers={USER: "bob", **CLAIMS})  # listed without values
    await d.handle(bob)
    assert (bob.objective, bob.fairness_id) == (None, "bob")
    carol = context(headers={USER: "carol", **CLAIMS})  # not listed: her own flow
    await d.handle(carol)
    assert (carol.objective, carol.fairness_id) == (None, "carol")


async def test_trusting_clients_honours_their_claims_but_not_over_the_verified_user():
    users = Users.from_config({"users": {"alice": {"objective": "std"}}})
    d = director(HeaderTrust(client_headers=True, users=users))
    anonymous = context(headers=dict(CLAIMS))
    await d.handle(anonymous)
    assert (anonymous.objective, anonymous.fairness_id) == ("vip", "someone-else")
    alice = context(headers={USER: "alice", **CLAIMS})
    await d.handle(alice)
    assert (alice.objective, alice.fairness_id) == ("std", "alice")
    # The client headers flag never extends to the model rewrite.
    rewrite = context(model="m", headers={MODEL_REWRITE_HEADER: "other"})
    await d.handle(rewrite)
    assert rewrite.target_model == "m"


async def test_route_rules_match_the_trusted_objective_not_the_claimed_one():
    route = {
        **SECRET_ROUTE,
        "spec": {
            "modelName": "secret",
            "rules": [
                {
                    "modelMatch": {"headers": {OBJECTIVE_HEADER: {"exact": "vip"}}},
                    "targetModels": [{"modelServerName": "secret"}],
                }
            ],
        },
    }
    users = Users.from_config({"users": {"alice": {"objective": "vip"}}})
    d = director(HeaderTrust(users=users), [route], [SECRET_SERVER])
    claimed = context(model="secret", headers={OBJECTIVE_HEADER: "vip"})
    with pytest.raises(PickerError) as err:
        await d.handle(claimed)
    assert err.value.status == 404  # no rule matches: the claim is ignored
    alice = context(model="secret", headers={USER: "alice"})
    (target,) = await d.handle(alice)
    assert target.address in (A1, B1)


@pytest.mark.parametrize(
    "section, where",
    [
        ([], "users must be a map"),
        ({"alice": "vip"}, "users.alice must be a map"),
        ({"alice": {"objective": 3}}, "users.alice.objective"),
        ({"alice": {"fairnessId": ""}}, "users.alice.fairnessId"),
        ({"alice": {"priority": 3}}, "unknown key(s) priority"),
        ({1: {}}, "not a user name"),
    ],
)
def test_a_malformed_users_section_is_refused(section, where):
    with pytest.raises(UsersConfigError, match=where.replace("(", r"\(").replace(")", r"\)")):
        Users.from_config({"users": section})


def test_the_picker_refuses_to_start_with_a_malformed_users_section(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(LEAST_REQUEST + "users:\n  alice: {objective: [vip]}\n")
    pool = tmp_path / "pool.yaml"
    pool.write_text("")
    proc = subprocess.run(
        [sys.executable, "-m", "infergw.epp", "--provider", "file", "--pool-file", str(pool),
         "--pool-name", "pool", "--config", str(config), "--host", "127.0.0.1",
         "--grpc-port", "0", "--grpc-health-port", "0", "--metrics-port", "0"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "users.alice.objective" in proc.stderr


# ---- requests without a body -----------------------------------------------------------------


@pytest.mark.parametrize(
    "method, path",
    [
        ("GET", "/v1/responses/resp_123?include=x"),
        ("DELETE", "/v1/responses/resp_123"),
        ("POST", "/v1/responses/resp_123/cancel"),
        ("GET", "/v1/conversations/conv_1/items"),
    ],
)
def test_the_inference_apis_reads_go_to_a_pod(method, path):
    assert len(director().pick_for_bodyless(method, path, None)) == 1


@pytest.mark.parametrize(
    "method, path",
    [
        ("POST", "/reset_prefix_cache"),
        ("POST", "/v1/unload_lora_adapter"),
        ("POST", "/sleep"),
        ("GET", "/metrics"),
        ("POST", "/v1/models"),
        ("DELETE", "/v1/models/m"),
        ("GET", "/v1/models/../../reset_prefix_cache"),
        ("GET", "/v1/models/a/b/c"),
        ("GET", "/v1/responses/%2e%2e"),
        ("DELETE", "/v1/responses/.."),
        ("GET", "/v1/modelsX"),
        ("GET", ""),
    ],
)
def test_anything_else_without_a_body_is_404(method, path):
    assert status_of(director().pick_for_bodyless, method, path, None) == 404


async def test_through_the_ext_proc_stream_only_api_paths_reach_a_pod(picker):
    for method, path in (("POST", "/reset_prefix_cache"), ("GET", "/metrics")):
        out = await ec.exchange(
            picker.target, [ec.headers(path, eos=True, extra={":method": method})]
        )
        status, body = ec.immediate(out)
        assert status == 404 and set(body["error"]) == {"message", "type", "param", "code"}
    # With a body, a non-inference path is refused as well.
    lora = {"lora_name": "x", "lora_path": "/tmp/x"}
    out = await ec.exchange(picker.target, [ec.headers("/v1/load_lora_adapter"), ec.body(lora)])
    assert ec.immediate(out)[0] == 404
    out = await ec.exchange(
        picker.target, [ec.headers("/v1/responses/resp_1", eos=True, extra=GET)]
    )
    assert ec.immediate(out) is None and ec.set_headers(out[0])["x-gateway-destination-endpoint"]


# ---- debug endpoints -------------------------------------------------------------------------

PRECISE = """\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: precise-prefix-cache-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: precise-prefix-cache-scorer
  - pluginRef: max-score-picker
"""


def precise_director() -> tuple[Director, KVCacheView]:
    ds = make_datastore()
    view = KVCacheView(ds, KVEventOptions(tokenizers={"m": DEFAULT_MODEL_DIR}))
    scheduling = load_config(PRECISE, Handle(kv_cache=view.cache))
    return Director(ds, scheduling, PickerMetrics(), DirectorOptions()), view


@pytest.mark.parametrize("debug", [False, True])
async def test_debug_pages_are_served_only_when_enabled(debug):
    d, view = precise_director()
    async with TestClient(TestServer(make_app(d.datastore, d.metrics, d, view, debug=debug))) as c:
        assert (await c.get("/debug/endpoints")).status == (200 if debug else 404)
        pd = await c.get("/debug/pd")  # no pd-profile-handler: the page itself says so
        assert pd.status == 404
        assert ("pd-profile-handler" in await pd.text()) is debug
        scored = await c.post("/debug/prefix-scores", json={"model": "m", "prompt": "hi"})
        assert scored.status == (200 if debug else 404)
        assert (await c.get("/metrics")).status == 200
        assert (await c.get("/healthz")).status in (200, 503)


async def test_prefix_scores_takes_at_most_one_mib():
    d, view = precise_director()
    async with TestClient(TestServer(make_app(d.datastore, d.metrics, d, view, debug=True))) as c:
        prompt = "x" * DEBUG_BODY_LIMIT
        r = await c.post("/debug/prefix-scores", json={"model": "m", "prompt": prompt})
        assert r.status == 413
        assert (await r.json())["error"]["code"] == 413


async def test_prefix_scores_tokenizes_off_the_event_loop(monkeypatch):
    d, view = precise_director()
    tokenizer = view.cache.tokenizers.get("m")
    threads = []
    real = tokenizer.tokens_for

    def recording(api, body):
        threads.append(threading.current_thread())
        return real(api, body)

    monkeypatch.setattr(tokenizer, "tokens_for", recording)
    async with TestClient(TestServer(make_app(d.datastore, d.metrics, d, view, debug=True))) as c:
        r = await c.post("/debug/prefix-scores", json={"model": "m", "prompt": "hello " * 500})
        assert r.status == 200, await r.text()
        assert (await r.json())["prompt_tokens"] > 0
    assert threads and threading.main_thread() not in threads


def test_trust_and_debug_are_off_unless_asked_for():
    from infergw.epp.options import parse_options

    base = ["--pool-name", "p", "--provider", "file", "--pool-file", "pool.yaml"]
    off = parse_options(base)
    assert not (off.trust_client_headers or off.trust_model_rewrite_header)
    assert not off.enable_debug_endpoints
    on = parse_options(
        [
            *base,
            "--trust-client-headers",
            "--trust-model-rewrite-header",
            "--enable-debug-endpoints",
        ]
    )
    assert on.trust_client_headers and on.trust_model_rewrite_header and on.enable_debug_endpoints


def test_a_prompt_tokenized_while_another_thread_holds_the_cache_is_not_held_up():
    """The debug page tokenizes in a worker thread with the same tokenizer the event loop
    uses: while one holds the prefix cache, the other encodes without it, to the same ids."""
    from infergw.kvindex.tokenize import PromptTokenizer

    tokenizer = PromptTokenizer.from_dir(DEFAULT_MODEL_DIR)
    prompt = {"prompt": "the same long shared prefix " * 40}
    expected = tokenizer.tokens_for("completions", prompt)
    cache = tokenizer._cache
    assert cache._lock.acquire()
    try:
        assert tokenizer.tokens_for("completions", prompt) == expected
    finally:
        cache._lock.release()
    assert tokenizer.tokens_for("completions", prompt) == expected  # cached again
