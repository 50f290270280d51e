"""Prefill/decode disaggregation in the picker: pd-profile-handler, decode-filter, prefill-filter.

Real configs (load_config), real plugins and real prefix state: the approximate scorer learns
through pre_request as the director drives it, the precise one reads a real KV block index fed
with BlockStored events and the simulator's tokenizer. Endpoints are hand-built with role and
group labels.
"""

from __future__ import annotations

import json

import pytest
from aiohttp.test_utils import TestClient, TestServer

from infergw.api import from_dict
from infergw.epp.context import RequestContext
from infergw.epp.datastore import Datastore, Endpoint, EndpointMetrics, PoolSpec
from infergw.epp.director import Director, DirectorOptions
from infergw.epp.errors import PickerError
from infergw.epp.http_server import make_app
from infergw.epp.kv_events import KVCacheView, KVEventOptions
from infergw.epp.metrics import PickerMetrics
from infergw.epp.request import InferenceRequest, parse_request
from infergw.epp.request_body import decode_body
from infergw.epp.routing.table import Resolution
from infergw.epp.scheduling.config import ConfigError, SchedulingConfig, load_config
from infergw.epp.scheduling.framework import ProfileResult, Scheduler, SchedulingResult
from infergw.epp.scheduling.handle import Handle
from infergw.epp.scheduling.plugins.pd_profile_handler import PREFILLER_HEADER, PDProfileHandler
from infergw.kvindex.events import BlockStored
from infergw.stack.local import DEFAULT_MODEL_DIR

PIN = "test-epp-endpoint-selection"
HEAD = "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\n"


def pd_config(threshold: int = 16, *, handler_params: str = "", extra_plugins: str = "") -> str:
    """Decode: pin header, decode-filter, prefix 2. Prefill: prefill-filter, prefix 3."""
    return (
        HEAD
        + f"""\
plugins:
- type: header-based-testing-filter
- type: decode-filter
- type: prefill-filter
- {{name: prefix, type: prefix-cache-scorer, parameters: {{blockSizeTokens: 1}}}}
- type: max-score-picker
- type: pd-profile-handler
  parameters: {{nonCachedTokens: {threshold}{handler_params}}}
{extra_plugins}schedulingProfiles:
- name: decode
  plugins:
  - pluginRef: header-based-testing-filter
  - pluginRef: decode-filter
  - {{pluginRef: prefix, weight: 2}}
- name: prefill
  plugins:
  - pluginRef: prefill-filter
  - {{pluginRef: prefix, weight: 3}}
"""
    )


def ep(n: int, role: str | None, group: str | None, **labels: str) -> Endpoint:
    if role is not None:
        labels["infergate.io/role"] = role
    if group is not None:
        labels["infergate.io/group"] = group
    return Endpoint(name=f"pod{n}-rank-0", pod=f"pod{n}", address=f"10.0.0.{n}:8000", labels=labels)


def req(
    prompt: str, *, pin: Endpoint | None = None, api: str = "completions", model: str = "m"
) -> RequestContext:
    request = InferenceRequest(
        request_id="r",
        path=f"/v1/{api}",
        api=api,
        body=decode_body(json.dumps({"model": model, "prompt": prompt}).encode()),
        raw_body=b"",
        model=model,
        headers={PIN: pin.address} if pin else {},
        prompt_text=prompt,
    )
    return RequestContext(request)


def schedule(cfg: SchedulingConfig, r: RequestContext, endpoints: list[Endpoint]):
    """What the director does: schedule (primary + 1 fallback), then the PreRequest plugins."""
    result = cfg.scheduler(2).schedule(r, endpoints)
    for plugin in cfg.pre_request:
        plugin.pre_request(r, result)
    return result


def remember(cfg: SchedulingConfig, prompt: str, endpoint: Endpoint, model: str = "m") -> None:
    """A request with `prompt` went to `endpoint` earlier: the prefix scorer learns it."""
    cfg.plugins["prefix"].pre_request(
        req(prompt, model=model), SchedulingResult({"x": ProfileResult([endpoint])}, "x")
    )


def decision(cfg: SchedulingConfig, r: RequestContext):
    return cfg.handler.decision(r)


def addresses(*endpoints: Endpoint) -> str:
    return ",".join(e.address for e in endpoints)


PROMPT = "".join(f"w{i:03d}" for i in range(50))  # 200 characters: 50 blocks, 50 tokens


# ---- the decode pick and the threshold ------------------------------------------------------


def test_the_decode_pod_is_the_one_holding_the_prompt_and_then_needs_no_prefill():
    cfg = load_config(pd_config(16))
    d1, d2, p1 = ep(1, "decode", "g"), ep(2, "decode", "g"), ep(3, "prefill", "g")
    remember(cfg, PROMPT, d2)
    for _ in range(5):
        r = req(PROMPT)
        result = schedule(cfg, r, [d1, d2, p1])
        assert result.targets[0] is d2 and p1 not in result.targets
        assert set(result.results) == {"decode"}  # the prefill profile never ran
        assert PREFILLER_HEADER not in r.upstream_headers
        d = decision(cfg, r)
        assert (d.outcome, d.reason, d.prompt_tokens, d.cached_tokens) == (
            "decode_only",
            "cached",
            50,
            50,
        )


def test_a_long_uncached_prompt_is_disaggregated_to_a_prefill_pod():
    cfg = load_config(pd_config(16))
    d1, p1 = ep(1, "decode", "g"), ep(2, "prefill", "g")
    r = req(PROMPT)
    result = schedule(cfg, r, [d1, p1])
    assert result.primary == "decode" and result.targets == [d1]
    assert result.results["prefill"].targets == [p1]
    assert r.upstream_headers[PREFILLER_HEADER] == p1.address
    d = decision(cfg, r)
    assert (d.outcome, d.reason, d.uncached_tokens, d.prefill) == (
        "disaggregated",
        "uncached",
        50,
        [p1.address],
    )


@pytest.mark.parametrize(
    ("cached_blocks", "threshold", "outcome"),
    [
        (40, 16, "decode_only"),  # 10 new tokens < 16
        (40, 10, "disaggregated"),  # 10 >= 10: the threshold itself disaggregates
        (40, 11, "decode_only"),
        (0, 50, "disaggregated"),
        (0, 51, "decode_only"),  # a prompt shorter than the threshold never is
    ],
)
def test_disaggregation_needs_at_least_the_threshold_of_uncached_tokens(
    cached_blocks, threshold, outcome
):
    cfg = load_config(pd_config(threshold))
    d1, p1 = ep(1, "decode", "g"), ep(2, "prefill", "g")
    if cached_blocks:
        remember(cfg, PROMPT[: 4 * cached_blocks], d1)
    r = req(PROMPT)
    schedule(cfg, r, [d1, p1])
    d = decision(cfg, r)
    assert (d.outcome, d.cached_tokens) == (outcome, cached_blocks)  # a block is a token here
    assert (PREFILLER_HEADER in r.upstream_headers) == (outcome == "disaggregated")


def test_threshold_zero_never_disaggregates():
    cfg = load_config(pd_config(0))
    d1, p1 = ep(1, "decode", "g"), ep(2, "prefill", "g")
    for i in range(5):
        r = req(PROMPT * (i + 1))
        result = schedule(cfg, r, [d1, p1])
        assert result.targets == [d1] and set(result.results) == {"decode"}
        assert PREFILLER_HEADER not in r.upstream_headers
        assert (decision(cfg, r).outcome, decision(cfg, r).reason) == ("decode_only", "disabled")


def test_only_chat_and_completions_are_disaggregated():
    cfg = load_config(pd_config(16))
    d1, p1 = ep(1, "decode", "g"), ep(2, "prefill", "g")
    r = req(PROMPT, api="embeddings")
    schedule(cfg, r, [d1, p1])
    assert (decision(cfg, r).outcome, decision(cfg, r).reason) == ("decode_only", "api")
    assert PREFILLER_HEADER not in r.upstream_headers


# ---- the adaptive threshold (pd_threshold.py) -------------------------------------------------

ADAPTIVE = ", decodeBatchWeight: 0.1, prefillQueueWeight: 1.0"


def loaded(e: Endpoint, running: float = 0, waiting: float = 0) -> Endpoint:
    e.metrics = EndpointMetrics(running=running, waiting=waiting, updated_at=1.0)
    e.stale = False
    return e


def test_a_busy_decode_pod_lowers_the_threshold():
    # 50 uncached tokens, nonCachedTokens 64: fixed, it stays on the decode pod; adaptive with
    # 10 sequences running there (64 / 2 = 32) and an idle prefill pod, it disaggregates.
    for params, outcome in (("", "decode_only"), (ADAPTIVE, "disaggregated")):
        cfg = load_config(pd_config(64, handler_params=params))
        d1, p1 = loaded(ep(1, "decode", "g"), running=10), loaded(ep(2, "prefill", "g"))
        r = req(PROMPT)
        schedule(cfg, r, [d1, p1])
        assert decision(cfg, r).outcome == outcome
        assert decision(cfg, r).threshold == (64 if not params else 32)


def test_a_queued_prefill_pod_raises_the_threshold():
    # 50 uncached tokens, nonCachedTokens 16; prefill pod with 3 prompts waiting: 16 × 4 = 64
    cfg = load_config(pd_config(16, handler_params=ADAPTIVE))
    d1, p1 = loaded(ep(1, "decode", "g")), loaded(ep(2, "prefill", "g"), waiting=3)
    r = req(PROMPT)
    result = schedule(cfg, r, [d1, p1])
    d = decision(cfg, r)
    assert (d.outcome, d.reason, d.threshold) == ("decode_only", "prefill_queued", 64)
    assert set(result.results) == {"decode"} and PREFILLER_HEADER not in r.upstream_headers
    assert p1.sent_since_scrape == 0  # no prefill leg was sent


def test_each_prefill_leg_counts_on_the_prefill_pod_until_its_next_scrape():
    # threshold 16 × (1 + q): 50 tokens disaggregate while q ≤ 2, then stay local
    cfg = load_config(pd_config(16, handler_params=ADAPTIVE))
    d1, p1 = loaded(ep(1, "decode", "g")), loaded(ep(2, "prefill", "g"))
    outcomes = []
    for i in range(4):
        r = req("".join(f"{'abcd'[i]}{j:03d}" for j in range(50)))  # new to both pods
        schedule(cfg, r, [d1, p1])
        outcomes.append(decision(cfg, r).outcome)
    assert outcomes == ["disaggregated"] * 3 + ["decode_only"]
    assert p1.sent_since_scrape == 3


def test_stale_metrics_fall_back_to_the_fixed_threshold():
    cfg = load_config(pd_config(64, handler_params=ADAPTIVE))
    d1, p1 = loaded(ep(1, "decode", "g"), running=10), loaded(ep(2, "prefill", "g"))
    d1.stale = True  # 10 running, but too long ago to trust
    r = req(PROMPT)
    schedule(cfg, r, [d1, p1])
    assert (decision(cfg, r).outcome, decision(cfg, r).threshold) == ("decode_only", 64)


def test_adaptive_parameters_are_bounded():
    for params, message in (
        (", decodeBatchWeight: -1", "decodeBatchWeight"),
        (", prefillQueueWeight: .inf", "prefillQueueWeight"),
        (", minNonCachedTokens: 0", "minNonCachedTokens"),
        (", minNonCachedTokens: 100, maxNonCachedTokens: 10", "minNonCachedTokens"),
        (", maxNonCachedTokens: 8", r"nonCachedTokens \(16\) must lie between"),
        (", decodeBatchWeight: .nan", "decodeBatchWeight"),
        (", prefillQueueWeight: 1e7", "prefillQueueWeight"),
        (", decodeBatchWeight: '0.1'", "decodeBatchWeight"),
        (", prefillQueueWeight: true", "prefillQueueWeight"),
        (", maxNonCachedTokens: 2.5", "maxNonCachedTokens"),
    ):
        with pytest.raises(ConfigError, match=message) as got:
            load_config(pd_config(16, handler_params=params))
        assert "pd-profile-handler" in str(got.value)  # the plugin is named too


# ---- the prefill pick: the decode pod's group, prefix hits first ----------------------------


def test_the_prefill_pod_comes_from_the_decode_pods_group_best_prefix_hits_first():
    cfg = load_config(pd_config(16))
    d1, p1, p2 = ep(1, "decode", "g1"), ep(2, "prefill", "g1"), ep(3, "prefill", "g1")
    d2, p3 = ep(4, "decode", "g2"), ep(5, "prefill", "g2")
    everyone = [d1, p1, p2, d2, p3]
    remember(cfg, PROMPT[:160], p2)  # 40 blocks on p2
    remember(cfg, PROMPT, p3)  # all of it, but in the other group
    r = req(PROMPT + "tail", pin=d1)
    result = schedule(cfg, r, everyone)
    assert result.targets == [d1]
    # p2's hits win; p1 is the fallback; p3 (another group) never appears.
    assert r.upstream_headers[PREFILLER_HEADER] == addresses(p2, p1)
    r = req(PROMPT + "tail", pin=d2)
    schedule(cfg, r, everyone)
    assert r.upstream_headers[PREFILLER_HEADER] == p3.address
    assert decision(cfg, r).group == "g2"


def test_the_prefill_pod_learns_the_prompt_too():
    cfg = load_config(pd_config(16))
    d1, p1, p2 = ep(1, "decode", "g"), ep(2, "prefill", "g"), ep(3, "prefill", "g")
    r = req(PROMPT)
    schedule(cfg, r, [d1, p1, p2])
    first = r.upstream_headers[PREFILLER_HEADER].split(",")[0]
    prefix = cfg.plugins["prefix"]
    assert prefix.cached_prompt(req(PROMPT), first) == (50, 50)
    assert prefix.cached_prompt(req(PROMPT), d1.address) == (50, 50)
    # Prompts with the same start, new to d1 past it, go to that prefill pod.
    for i in range(5):
        r = req(PROMPT + str(i) + "x" * 100, pin=d1)
        schedule(cfg, r, [d1, p1, p2])
        assert r.upstream_headers[PREFILLER_HEADER].split(",")[0] == first


def test_decode_fallbacks_are_cut_to_the_group_when_disaggregated():
    cfg = load_config(pd_config(16))
    d1, d2, d3 = ep(1, "decode", "g1"), ep(2, "decode", "g2"), ep(3, "decode", "g1")
    p1 = ep(4, "prefill", "g1")
    remember(cfg, PROMPT[:20], d1)  # d1 best, d2 second, d3 last
    remember(cfg, PROMPT[:8], d2)
    r = req(PROMPT)
    result = schedule(cfg, r, [d1, d2, d3, p1])
    assert decision(cfg, r).outcome == "disaggregated"
    assert result.targets == [d1]  # d2 would pair with p1 across groups
    # Decode-only keeps the fallbacks as they are.
    cfg = load_config(pd_config(0))
    remember(cfg, PROMPT[:20], d1)
    remember(cfg, PROMPT[:8], d2)
    assert schedule(cfg, req(PROMPT), [d1, d2, d3, p1]).targets == [d1, d2]


def test_no_prefill_pod_in_the_group_serves_aggregated():
    metrics = PickerMetrics()
    cfg = load_config(pd_config(16), Handle(metrics=metrics))
    d1, d2, p2 = ep(1, "decode", "g1"), ep(2, "decode", "g2"), ep(3, "prefill", "g2")
    r = req(PROMPT, pin=d1)
    result = schedule(cfg, r, [d1, d2, p2])
    assert result.targets == [d1] and set(result.results) == {"decode"}
    assert PREFILLER_HEADER not in r.upstream_headers
    assert decision(cfg, r).outcome == "no_prefill_pod"
    assert (
        metrics.registry.get_sample_value(
            "infergate_epp_pd_decisions_total", {"outcome": "no_prefill_pod"}
        )
        == 1.0
    )


def test_both_pods_decode_and_prefill_but_never_for_themselves():
    cfg = load_config(pd_config(16))
    d1, b1 = ep(1, "decode", "g1"), ep(2, "both", "g1")
    r = req(PROMPT, pin=d1)
    schedule(cfg, r, [d1, b1])
    assert r.upstream_headers[PREFILLER_HEADER] == b1.address
    b2, b3 = ep(3, "both", "g2"), ep(4, "both", "g2")
    for i in range(5):
        r = req(f"{i}{PROMPT}")
        result = schedule(cfg, r, [b2, b3])
        other = b3 if result.targets[0] is b2 else b2
        assert r.upstream_headers[PREFILLER_HEADER] == other.address
    lone = ep(5, "both", "g3")
    r = req(PROMPT + "?")
    assert schedule(cfg, r, [lone]).targets == [lone]
    assert decision(cfg, r).outcome == "no_prefill_pod"


def test_role_filters_read_the_role_label():
    cfg = load_config(pd_config(16))
    pods = [ep(1, "decode", None), ep(2, "prefill", None), ep(3, "both", None), ep(4, None, None)]
    decode, prefill = cfg.plugins["decode-filter"], cfg.plugins["prefill-filter"]
    r = req("x")
    assert [e.pod for e in decode.filter(r, pods)] == ["pod1", "pod3", "pod4"]  # unlabelled decodes
    assert [e.pod for e in prefill.filter(r, pods)] == ["pod2", "pod3"]
    strict = load_config(
        HEAD
        + "plugins:\n- {type: decode-filter, parameters: {allowUnlabeled: false}}\n"
        + "schedulingProfiles:\n- {name: d, plugins: [{pluginRef: decode-filter}]}\n"
    )
    assert [e.pod for e in strict.plugins["decode-filter"].filter(r, pods)] == ["pod1", "pod3"]


def test_pods_without_a_group_label_pair_with_each_other():
    cfg = load_config(pd_config(16))
    d1, p1, p2 = ep(1, "decode", None), ep(2, "prefill", None), ep(3, "prefill", "g")
    r = req(PROMPT)
    schedule(cfg, r, [d1, p1, p2])
    assert r.upstream_headers[PREFILLER_HEADER] == p1.address


ROLE = "infergate.io/role"


def routed(
    r: RequestContext,
    *,
    group_key: str = "example.com/pair",
    prefill: dict[str, str] | None = None,
    decode: dict[str, str] | None = None,
) -> RequestContext:
    """`r` as routed to a ModelServer with this pdGroup (role labels by default)."""
    server = from_dict(
        {
            "apiVersion": "networking.infergate.io/v1alpha1",
            "kind": "ModelServer",
            "metadata": {"name": "pd", "namespace": "default"},
            "spec": {
                "inferenceEngine": "vLLM",
                "workloadSelector": {
                    "matchLabels": {"app": "x"},
                    "pdGroup": {
                        "groupKey": group_key,
                        "prefillLabels": prefill or {ROLE: "prefill"},
                        "decodeLabels": decode or {ROLE: "decode"},
                    },
                },
            },
        }
    )
    r.resolution = Resolution(route=None, rule="r", target_model="m", candidates=[], server=server)
    return r


def test_the_model_servers_pd_labels_decide_the_roles_not_the_role_label():
    cfg = load_config(pd_config(16))
    decode, prefill = cfg.plugins["decode-filter"], cfg.plugins["prefill-filter"]
    tiers = {"prefill": {"tier": "prompt", "size": "big"}, "decode": {"tier": "gen"}}
    pods = [
        ep(1, "decode", None, tier="prompt", size="big"),  # the role label says the opposite
        ep(2, "prefill", None, tier="gen"),
        ep(3, None, None, tier="prompt"),  # only part of prefillLabels: no role
        ep(4, None, None, tier="both", size="big"),  # both counts for either role
        ep(5, "prefill", None),  # no tier at all: unlabelled for this server
    ]
    r = routed(req("x"), **tiers)
    assert [e.pod for e in prefill.filter(r, pods)] == ["pod1", "pod4"]
    assert [e.pod for e in decode.filter(r, pods)] == ["pod2", "pod4", "pod5"]
    plain = req("x")  # no ModelServer: the role label, as configured
    assert [e.pod for e in prefill.filter(plain, pods)] == ["pod2", "pod5"]
    assert [e.pod for e in decode.filter(plain, pods)] == ["pod1", "pod3", "pod4"]


def test_disaggregation_follows_the_model_servers_pd_labels():
    cfg = load_config(pd_config(16))
    tiers = {"prefill": {"tier": "prompt"}, "decode": {"tier": "gen"}}
    d1 = ep(1, "prefill", "g", tier="gen")  # role label "prefill", but the server says decode
    p1 = ep(2, "decode", "g", tier="prompt")
    r = routed(req(PROMPT), group_key="infergate.io/group", **tiers)
    schedule(cfg, r, [d1, p1])
    assert decision(cfg, r).decode == d1.address
    assert r.upstream_headers[PREFILLER_HEADER] == p1.address
    r = req("z" + PROMPT)  # without the server the role label decides: the other way round
    schedule(cfg, r, [d1, p1])
    assert decision(cfg, r).decode == p1.address
    assert r.upstream_headers[PREFILLER_HEADER] == d1.address


def test_the_model_servers_pd_group_key_names_the_group_label():
    cfg = load_config(pd_config(16))
    # infergate.io/group says one group; the server's groupKey says two.
    d1 = ep(1, "decode", "all", **{"example.com/pair": "a"})
    p1 = ep(2, "prefill", "all", **{"example.com/pair": "b"})
    p2 = ep(3, "prefill", "all", **{"example.com/pair": "a"})
    r = routed(req(PROMPT, pin=d1))
    schedule(cfg, r, [d1, p1, p2])
    assert r.upstream_headers[PREFILLER_HEADER] == p2.address
    assert (decision(cfg, r).group_key, decision(cfg, r).group) == ("example.com/pair", "a")
    r = req("z" + PROMPT, pin=d1)  # no ModelServer: the default label, one group
    schedule(cfg, r, [d1, p1, p2])
    assert set(r.upstream_headers[PREFILLER_HEADER].split(",")) == {p1.address, p2.address}


def test_a_custom_group_label_parameter():
    cfg = load_config(pd_config(16, handler_params=", groupLabel: rack"))
    d1 = ep(1, "decode", "all", rack="r1")
    p1, p2 = ep(2, "prefill", "all", rack="r2"), ep(3, "prefill", "all", rack="r1")
    r = req(PROMPT, pin=d1)
    schedule(cfg, r, [d1, p1, p2])
    assert r.upstream_headers[PREFILLER_HEADER] == p2.address


# ---- the precise index ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def view():
    return KVCacheView(Datastore(), KVEventOptions(tokenizers={"m": DEFAULT_MODEL_DIR}))


LONG = " ".join(f"the quick brown fox {i} jumps over the lazy dog" for i in range(12))


def test_the_precise_index_decides_what_the_decode_pod_holds(view):
    extra = "- type: precise-prefix-cache-scorer\n"
    cfg = load_config(pd_config(16, extra_plugins=extra), Handle(kv_cache=view.cache))
    assert [p.name for p in cfg.handler.sources] == ["precise-prefix-cache-scorer", "prefix"]
    d1, d2, p1 = ep(1, "decode", "g"), ep(2, "decode", "g"), ep(3, "prefill", "g")
    tokens = view.cache.tokenizers.get("m").tokens_for(
        "completions", {"model": "m", "prompt": LONG}
    )
    bs = view.cache.block_size
    full = len(tokens) // bs
    assert full >= 4
    # What the KV events say: d1 holds every full block of the prompt, d2 its first block.
    view.translator.apply(
        d1.address,
        "m",
        BlockStored(tuple(range(1, full + 1)), None, tuple(tokens[: full * bs]), bs),
    )
    view.translator.apply(d2.address, "m", BlockStored((99,), None, tuple(tokens[:bs]), bs))
    r = req(LONG, pin=d1)
    schedule(cfg, r, [d1, d2, p1])
    d = decision(cfg, r)
    # The approximate scorer knows nothing of d1; the index knows it holds all but the tail.
    assert (d.source, d.prompt_tokens, d.cached_tokens) == (
        "precise-prefix-cache-scorer",
        len(tokens),
        full * bs,
    )
    assert d.outcome == "decode_only"
    r = req(LONG, pin=d2)
    schedule(cfg, r, [d1, d2, p1])
    d = decision(cfg, r)
    assert (d.cached_tokens, d.outcome) == (bs, "disaggregated")
    assert r.upstream_headers[PREFILLER_HEADER] == p1.address


def test_without_a_tokenizer_the_approximate_scorer_answers(view):
    extra = "- type: precise-prefix-cache-scorer\n"
    cfg = load_config(pd_config(16, extra_plugins=extra), Handle(kv_cache=view.cache))
    d1, p1 = ep(1, "decode", "g"), ep(2, "prefill", "g")
    remember(cfg, PROMPT, d1, model="no-tokenizer")
    r = req(PROMPT, pin=d1, model="no-tokenizer")
    schedule(cfg, r, [d1, p1])
    assert (decision(cfg, r).source, decision(cfg, r).outcome) == ("prefix", "decode_only")


# ---- config, metrics, debug, director -------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("{nonCachedTokens: 16}", "{}"), "nonCachedTokens is required"),
        (
            ("{nonCachedTokens: 16}", "{nonCachedTokens: -1}"),
            "nonCachedTokens: expected `int` >= 0, got -1",
        ),
        (
            ("{nonCachedTokens: 16}", "{nonCachedTokens: 16, treshold: 1}"),
            "unknown parameter 'treshold'",
        ),
        (("- name: prefill\n", "- name: prefil\n"), "no schedulingProfile is named 'prefill'"),
        (("16}", "16, prefixScorer: decode-filter}"), "names no prefix-cache-scorer"),
        (("- name: decode\n", "- name: other\n  plugins: []\n- name: decode\n"), "never run"),
    ],
)
def test_config_mistakes_are_precise_errors(change, message):
    text = pd_config(16).replace(*change)
    with pytest.raises(ConfigError, match=message):
        load_config(text)


def test_single_profile_scheduling_does_not_ask_for_candidates():
    cfg = load_config(None)
    assert cfg.scheduler(2)._narrows is False
    pd = load_config(pd_config(16))
    assert isinstance(pd.handler, PDProfileHandler) and pd.scheduler(2)._narrows is True
    assert isinstance(pd.scheduler(2), Scheduler)


def test_metrics_count_outcomes_and_both_picks():
    metrics = PickerMetrics()
    cfg = load_config(pd_config(16), Handle(metrics=metrics))
    d1, p1 = ep(1, "decode", "g"), ep(2, "prefill", "g")
    schedule(cfg, req(PROMPT), [d1, p1])  # new: disaggregated
    schedule(cfg, req(PROMPT), [d1, p1])  # d1 holds it now: decode only

    def value(name, **labels):
        return metrics.registry.get_sample_value(name, labels)

    assert value("infergate_epp_pd_decisions_total", outcome="disaggregated") == 1
    assert value("infergate_epp_pd_decisions_total", outcome="decode_only") == 1
    assert value("infergate_epp_pd_endpoint_picks_total", role="decode", endpoint=d1.address) == 2
    assert value("infergate_epp_pd_endpoint_picks_total", role="prefill", endpoint=p1.address) == 1
    assert value("infergate_epp_pd_uncached_prompt_tokens_count") == 2
    assert value("infergate_epp_pd_uncached_prompt_tokens_sum") == 50


async def test_debug_pd_lists_the_last_decisions_newest_first():
    pool = PoolSpec("pool", "default", {"app": "x"}, [8000])
    ds = Datastore()
    ds.set_pool(pool)
    ds.replace_pods(
        [
            {
                "metadata": {"name": name, "labels": {"app": "x", **labels}},
                "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]},
            }
            for name, ip, labels in [
                ("decode", "10.0.0.1", {"infergate.io/role": "decode"}),
                ("prefill", "10.0.0.2", {"infergate.io/role": "prefill"}),
            ]
        ]
    )
    metrics = PickerMetrics()
    config = load_config(pd_config(16, handler_params=", historySize: 2"), Handle(metrics=metrics))
    director = Director(ds, config, metrics, DirectorOptions())
    client = TestClient(TestServer(make_app(ds, metrics, director, debug=True)))
    await client.start_server()
    try:
        for prompt in ("a" * 200, "b" * 200, "c" * 8):
            body = f'{{"model": "m", "prompt": "{prompt}"}}'.encode()
            r = RequestContext(parse_request("/v1/completions", body, {}, max_body_bytes=1 << 20))
            targets = await director.handle(r)
            assert [e.address for e in targets] == ["10.0.0.1:8000"]
            if prompt[0] != "c":
                assert r.upstream_headers[PREFILLER_HEADER] == "10.0.0.2:8000"
        page = await (await client.get("/debug/pd")).json()
        assert page["nonCachedTokens"] == 16 and page["cacheSources"] == ["prefix"]
        assert page["decisions_total"] == {"disaggregated": 2, "decode_only": 1}
        recent = page["recent"]
        assert [d["outcome"] for d in recent] == ["decode_only", "disaggregated"]
        assert recent[1]["prefill"] == ["10.0.0.2:8000"] and recent[1]["decode"] == "10.0.0.1:8000"
        assert recent[1]["uncached_tokens"] == 50
        text = await (await client.get("/metrics")).text()
        assert 'infergate_epp_pd_decisions_total{outcome="disaggregated"} 2.0' in text
    finally:
        await client.close()


async def test_debug_pd_is_404_without_the_handler():
    ds, metrics = Datastore(), PickerMetrics()
    director = Director(ds, load_config(None), metrics, DirectorOptions())
    client = TestClient(TestServer(make_app(ds, metrics, director, debug=True)))
    await client.start_server()
    try:
        resp = await client.get("/debug/pd")
        assert resp.status == 404
        assert "pd-profile-handler" in (await resp.json())["error"]["message"]
    finally:
        await client.close()


def test_no_decode_pod_is_429():
    cfg = load_config(pd_config(16))
    with pytest.raises(PickerError) as info:
        schedule(cfg, req(PROMPT), [ep(1, "prefill", "g")])
    assert info.value.status == 429


def test_only_pods_that_can_be_a_destination_count_for_flow_control():
    cfg = load_config(pd_config())
    pods = [ep(1, "prefill", "g"), ep(2, "decode", "g"), ep(3, "both", "g"), ep(4, None, None)]
    r = req("x")
    assert cfg.handler.destinations(r, pods) == pods[1:]  # a prefill pod never is one
    plain = load_config(None)  # one profile: every candidate can be
    assert plain.handler.destinations(r, pods) == pods


def test_the_model_servers_prefill_labels_say_which_pods_are_no_destination():
    cfg = load_config(pd_config())
    pods = [ep(1, None, "g", tier="prompt"), ep(2, "prefill", "g", tier="gen"), ep(3, None, None)]
    r = routed(req("x"), prefill={"tier": "prompt"}, decode={"tier": "gen"})
    # tier decides, not infergate.io/role: pod2 is labelled prefill by the role label alone.
    assert cfg.handler.destinations(r, pods) == pods[1:]
