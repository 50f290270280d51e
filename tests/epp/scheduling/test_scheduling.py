"""epp/scheduling/framework.py and config.py: EndpointPickerConfig and the scheduler loop."""

from __future__ import annotations

import pytest

from infergw.epp.context import RequestContext
from infergw.epp.datastore import Endpoint
from infergw.epp.errors import PickerError
from infergw.epp.scheduling import registry
from infergw.epp.scheduling.config import ConfigError, load_config
from infergw.epp.scheduling.config_file import API_VERSIONS
from infergw.epp.scheduling.framework import (
    Filter,
    Picker,
    Profile,
    ProfileResult,
    Scheduler,
    Scorer,
    WeightedScorer,
)
from infergw.epp.scheduling.plugins.kv_cache_utilization import KVCacheUtilizationScorer
from infergw.epp.scheduling.plugins.pickers import MaxScorePicker
from infergw.epp.scheduling.plugins.prefix_cache import PrefixCacheScorer
from infergw.epp.scheduling.plugins.profile_handlers import SingleProfileHandler
from infergw.epp.scheduling.plugins.queue import QueueScorer
from tests.request_fixtures import bare_context

HEADER = """\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
"""


def config(body: str):
    return load_config(HEADER + body)


def config_error(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(text)
    return str(info.value)


def endpoints(n: int) -> list[Endpoint]:
    return [
        Endpoint(name=f"p{i}-rank-0", pod=f"p{i}", address=f"10.0.0.{i}:8000") for i in range(n)
    ]


def request() -> RequestContext:
    return bare_context(prompt_text="hello")


# ---- the default config -------------------------------------------------------------------


def test_default_config_matches_the_reference_defaults():
    cfg = load_config(None)
    assert list(cfg.profiles) == ["default"]
    profile = cfg.profiles["default"]
    assert profile.filters == []
    weights = {(type(ws.scorer), ws.weight) for ws in profile.scorers}
    assert weights == {
        (QueueScorer, 2.0),
        (KVCacheUtilizationScorer, 2.0),
        (PrefixCacheScorer, 3.0),
    }
    assert isinstance(profile.picker, MaxScorePicker)
    assert isinstance(cfg.handler, SingleProfileHandler)
    assert [type(p) for p in cfg.pre_request] == [PrefixCacheScorer]
    assert cfg.feature_gates == []


def test_default_config_schedules():
    cfg = load_config(None)
    eps = endpoints(3)
    for e in eps:
        e.stale = False
    eps[1].metrics.waiting = 0
    eps[0].metrics.waiting = eps[2].metrics.waiting = 5
    result = cfg.scheduler(1).schedule(request(), eps)
    assert [e.address for e in result.targets] == [eps[1].address]
    assert result.primary == "default"


# ---- building configs ---------------------------------------------------------------------


def test_name_defaults_to_type_and_weight_to_one():
    cfg = config(
        """
plugins:
- type: queue-scorer
- {name: kv, type: kv-cache-utilization-scorer}
schedulingProfiles:
- name: p
  plugins: [{pluginRef: queue-scorer}, {pluginRef: kv, weight: 0.5}]
"""
    )
    assert set(cfg.plugins) == {"queue-scorer", "kv"}
    assert cfg.plugins["kv"].name == "kv"
    profile = cfg.profiles["p"]
    assert [(ws.scorer.name, ws.weight) for ws in profile.scorers] == [
        ("queue-scorer", 1.0),
        ("kv", 0.5),
    ]
    # No picker referenced: max-score-picker; no handler: single-profile-handler.
    assert isinstance(profile.picker, MaxScorePicker)
    assert isinstance(cfg.handler, SingleProfileHandler)


def test_filters_keep_their_order_and_parameters_reach_the_plugin():
    cfg = config(
        """
plugins:
- {type: low-queue-filter, parameters: {threshold: 3}}
- type: header-based-testing-filter
- {type: random-picker, parameters: {seed: 1}}
schedulingProfiles:
- name: p
  plugins:
  - pluginRef: header-based-testing-filter
  - pluginRef: low-queue-filter
  - pluginRef: random-picker
"""
    )
    profile = cfg.profiles["p"]
    assert [f.type_name for f in profile.filters] == [
        "header-based-testing-filter",
        "low-queue-filter",
    ]
    assert profile.filters[1].threshold == 3.0
    assert profile.picker.type_name == "random-picker"
    assert profile.scorers == []


def test_the_same_type_twice_under_different_names():
    cfg = config(
        """
plugins:
- {name: a, type: queue-scorer}
- {name: b, type: queue-scorer}
schedulingProfiles:
- name: p
  plugins: [{pluginRef: a, weight: 1}, {pluginRef: b, weight: 2}]
"""
    )
    a, b = cfg.profiles["p"].scorers
    assert a.scorer is not b.scorer
    assert (a.weight, b.weight) == (1.0, 2.0)


def test_explicit_handler_and_feature_gates():
    cfg = config(
        """
featureGates: [flowControl]
plugins:
- {name: h, type: single-profile-handler}
- type: queue-scorer
schedulingProfiles:
- name: p
  plugins: [{pluginRef: queue-scorer}]
"""
    )
    assert cfg.handler is cfg.plugins["h"]
    assert cfg.feature_gates == ["flowControl"]


def test_session_affinity_is_a_pre_request_plugin():
    cfg = config(
        """
plugins: [{type: session-affinity-scorer}]
schedulingProfiles: [{name: p, plugins: [{pluginRef: session-affinity-scorer}]}]
"""
    )
    assert [p.type_name for p in cfg.pre_request] == ["session-affinity-scorer"]
    assert cfg.post_response == []


@pytest.mark.parametrize("api_version", API_VERSIONS)
def test_every_known_api_version(api_version):
    text = f"""
apiVersion: {api_version}
kind: EndpointPickerConfig
plugins: [{{type: queue-scorer}}]
schedulingProfiles: [{{name: p, plugins: [{{pluginRef: queue-scorer}}]}}]
"""
    assert "p" in load_config(text).profiles


def test_registry_knows_every_documented_plugin():
    assert set(registry.PLUGIN_TYPES) >= {
        "queue-scorer",
        "running-requests-scorer",
        "kv-cache-utilization-scorer",
        "least-request",
        "low-queue-filter",
        "least-latency-scorer",
        "lora-affinity-scorer",
        "lora-affinity-filter",
        "prefix-cache-scorer",
        "session-affinity-scorer",
        "random-scorer",
        "max-score-picker",
        "weighted-random-picker",
        "random-picker",
        "header-based-testing-filter",
        "single-profile-handler",
    }
    for type_name, cls in registry.PLUGIN_TYPES.items():
        assert cls.type_name == type_name


# ---- config errors ------------------------------------------------------------------------

PROFILE = "schedulingProfiles: [{name: p, plugins: [{pluginRef: queue-scorer}]}]\n"


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("plugins: [\n", "YAML"),
        ("- a\n- b\n", "mapping"),
        ("", "mapping"),
        (
            "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: Other\n" + PROFILE,
            "kind",
        ),
        ("apiVersion: v1\nkind: EndpointPickerConfig\n" + PROFILE, "apiVersion"),
        ("kind: EndpointPickerConfig\n" + PROFILE, "apiVersion"),
    ],
)
def test_document_level_errors(text, words):
    assert words in config_error(text)


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ("plugins: [{type: no-such-scorer}]\n" + PROFILE, "unknown plugin type"),
        ("plugins: [{name: x}]\n" + PROFILE, "needs a 'type'"),
        ("plugins: [{type: 5}]\n" + PROFILE, "needs a 'type'"),
        ("plugins: [queue-scorer]\n" + PROFILE, "needs a 'type'"),
        ("plugins: [{type: queue-scorer}, {type: queue-scorer}]\n" + PROFILE, "duplicate"),
        (
            "plugins: [{name: a, type: queue-scorer}, {name: a, type: random-picker}]\n" + PROFILE,
            "duplicate",
        ),
        ("plugins: [{type: queue-scorer, parameters: [1]}]\n" + PROFILE, "parameters"),
        (
            "plugins: [{type: least-request, parameters: {by: bytes}}, {type: queue-scorer}]\n"
            + PROFILE,
            "least-request",
        ),
        (
            "plugins: [{type: least-latency-scorer, parameters: {maxOutputTokens: many}}, "
            "{type: queue-scorer}]\n" + PROFILE,
            "least-latency-scorer",
        ),
    ],
)
def test_plugin_errors(body, words):
    assert words in config_error(HEADER + body)


PLUGINS = """\
plugins:
- type: queue-scorer
- type: max-score-picker
- type: random-picker
- type: single-profile-handler
"""


@pytest.mark.parametrize(
    ("profiles", "words"),
    [
        ("schedulingProfiles: []", "at least one"),
        ("", "at least one"),
        ("schedulingProfiles: [{plugins: []}]", "needs a 'name'"),
        ("schedulingProfiles: [{name: p, plugins: [{pluginRef: nope}]}]", "names no plugin"),
        ("schedulingProfiles: [{name: p, plugins: [queue-scorer]}]", "names no plugin"),
        ("schedulingProfiles: [{name: p, plugins: [{weight: 1}]}]", "names no plugin"),
        (
            "schedulingProfiles: [{name: p, plugins: [{pluginRef: queue-scorer, weight: -1}]}]",
            "weight",
        ),
        (
            "schedulingProfiles: [{name: p, plugins: [{pluginRef: queue-scorer, weight: x}]}]",
            "weight",
        ),
        (
            "schedulingProfiles: [{name: p, plugins: [{pluginRef: queue-scorer, weight: .nan}]}]",
            "weight",
        ),
        (
            "schedulingProfiles: [{name: p, plugins: "
            "[{pluginRef: max-score-picker}, {pluginRef: random-picker}]}]",
            "one picker",
        ),
        (
            "schedulingProfiles: [{name: p, plugins: [{pluginRef: single-profile-handler}]}]",
            "not a filter, scorer or picker",
        ),
        (
            "schedulingProfiles: [{name: p, plugins: []}, {name: p, plugins: []}]",
            "duplicate profile",
        ),
    ],
)
def test_profile_errors(profiles, words):
    assert words in config_error(HEADER + PLUGINS + profiles)


def test_at_most_one_profile_handler():
    body = """
plugins:
- {name: h1, type: single-profile-handler}
- {name: h2, type: single-profile-handler}
schedulingProfiles: [{name: p, plugins: []}]
"""
    assert "profile handler" in config_error(HEADER + body)


def test_feature_gates_must_be_a_list():
    body = "featureGates: flowControl\n" + PLUGINS + "schedulingProfiles: [{name: p}]\n"
    assert "featureGates" in config_error(HEADER + body)


def test_zero_weight_is_allowed():
    cfg = config(
        PLUGINS + "schedulingProfiles: [{name: p, plugins: [{pluginRef: queue-scorer, weight: 0}]}]"
    )
    assert cfg.profiles["p"].scorers[0].weight == 0.0


def test_several_profiles_need_an_explicit_handler():
    body = PLUGINS.replace("- type: single-profile-handler\n", "") + (
        "schedulingProfiles: [{name: a, plugins: []}, {name: b, plugins: []}]\n"
    )
    config_error(HEADER + body)


@pytest.mark.parametrize(
    "body",
    [
        "plugins: [{name: [a], type: queue-scorer}]\n" + PROFILE,
        "plugins: [{type: queue-scorer}]\n"
        "schedulingProfiles: [{name: p, plugins: [{pluginRef: [queue-scorer]}]}]\n",
        "plugins: [{type: queue-scorer}]\nschedulingProfiles: [{name: [p], plugins: []}]\n",
        "plugins: 5\n" + PROFILE,
    ],
    ids=["list-name", "list-pluginRef", "list-profile-name", "int-plugins"],
)
def test_malformed_shapes_are_config_errors(body):
    config_error(HEADER + body)


# ---- the scheduler ------------------------------------------------------------------------


class Fixed(Scorer):
    type_name = "fixed-test-scorer"

    def __init__(self, name, values):
        super().__init__(name)
        self.values = values

    def score(self, req, endpoints):
        return [self.values[e.address] for e in endpoints]


class Keep(Filter):
    type_name = "keep-test-filter"

    def __init__(self, name, keep):
        super().__init__(name)
        self.keep = keep
        self.seen: list[list[str]] = []

    def filter(self, req, endpoints):
        self.seen.append([e.address for e in endpoints])
        return [e for e in endpoints if e.address in self.keep]


class Recorder(Picker):
    type_name = "recorder-test-picker"

    def __init__(self):
        super().__init__("rec")
        self.calls: list[tuple[list[tuple[str, float]], int]] = []

    def pick(self, req, scored, count):
        self.calls.append(([(e.address, s) for e, s in scored], count))
        return [e for e, _ in sorted(scored, key=lambda es: -es[1])][:count]


def scheduler(profile: Profile, max_endpoints: int = 1, observe=None) -> Scheduler:
    return Scheduler({profile.name: profile}, SingleProfileHandler("h"), max_endpoints, observe)


def test_scores_sum_clamped_times_weight():
    eps = endpoints(3)
    a, b, c = (e.address for e in eps)
    picker = Recorder()
    profile = Profile(
        "p",
        scorers=[
            WeightedScorer(Fixed("s1", {a: 1.5, b: -0.5, c: 0.5}), 2.0),
            WeightedScorer(Fixed("s2", {a: 0.0, b: 1.0, c: 0.25}), 3.0),
        ],
        picker=picker,
    )
    result = scheduler(profile).schedule(request(), eps)
    expected = {a: 2.0, b: 3.0, c: 1.75}
    assert result.results["p"].scores == pytest.approx(expected)
    assert dict(picker.calls[0][0]) == pytest.approx(expected)
    assert [e.address for e in result.targets] == [b]


def test_no_scorers_means_all_zero():
    picker = Recorder()
    scheduler(Profile("p", picker=picker)).schedule(request(), endpoints(2))
    assert [s for _, s in picker.calls[0][0]] == [0.0, 0.0]


def test_zero_weight_scorer_does_not_count():
    eps = endpoints(2)
    profile = Profile(
        "p",
        scorers=[WeightedScorer(Fixed("s", {eps[0].address: 1.0, eps[1].address: 0.0}), 0.0)],
        picker=Recorder(),
    )
    scores = scheduler(profile).schedule(request(), eps).results["p"].scores
    assert set(scores.values()) == {0.0}


def test_filters_run_in_order_on_what_the_previous_kept():
    eps = endpoints(4)
    addrs = [e.address for e in eps]
    first = Keep("f1", set(addrs[:3]))
    second = Keep("f2", set(addrs[1:]))
    picker = Recorder()
    profile = Profile("p", filters=[first, second], picker=picker)
    scheduler(profile, max_endpoints=4).schedule(request(), eps)
    assert first.seen == [addrs]
    assert second.seen == [addrs[:3]]
    assert [a for a, _ in picker.calls[0][0]] == addrs[1:3]


def test_a_filter_that_empties_the_list_is_429_and_later_filters_do_not_run():
    eps = endpoints(2)
    later = Keep("f2", {e.address for e in eps})
    profile = Profile("p", filters=[Keep("f1", set()), later], picker=Recorder())
    with pytest.raises(PickerError) as info:
        scheduler(profile).schedule(request(), eps)
    assert info.value.status == 429
    assert later.seen == []


def test_no_candidates_is_503():
    with pytest.raises(PickerError) as info:
        scheduler(Profile("p", picker=Recorder())).schedule(request(), [])
    assert info.value.status == 503


@pytest.mark.parametrize(("max_endpoints", "expected"), [(1, 1), (2, 2), (3, 3), (5, 3)])
def test_max_endpoints_is_honored(max_endpoints, expected):
    picker = Recorder()
    result = scheduler(Profile("p", picker=picker), max_endpoints).schedule(request(), endpoints(3))
    assert picker.calls[0][1] == max_endpoints
    assert len(result.targets) == expected
    assert len({e.address for e in result.targets}) == expected


def test_max_endpoints_with_the_real_picker_orders_best_first():
    eps = endpoints(4)
    values = {e.address: v for e, v in zip(eps, (0.1, 0.9, 0.5, 0.7), strict=True)}
    profile = Profile(
        "p", scorers=[WeightedScorer(Fixed("s", values), 1.0)], picker=MaxScorePicker("m")
    )
    result = scheduler(profile, 3).schedule(request(), eps)
    assert [e.address for e in result.targets] == [eps[1].address, eps[3].address, eps[2].address]


def test_plugin_durations_are_observed():
    seen = []
    eps = endpoints(2)
    profile = Profile(
        "p",
        filters=[Keep("f", {e.address for e in eps})],
        scorers=[WeightedScorer(Fixed("s", {e.address: 1.0 for e in eps}), 1.0)],
        picker=Recorder(),
    )
    scheduler(profile, observe=lambda *args: seen.append(args)).schedule(request(), eps)
    assert [a[:3] for a in seen] == [
        ("Filter", "keep-test-filter", "f"),
        ("Scorer", "fixed-test-scorer", "s"),
        ("Picker", "recorder-test-picker", "rec"),
    ]
    assert all(isinstance(a[3], float) and a[3] >= 0 for a in seen)


def test_profile_result_targets_are_the_primary_profiles():
    eps = endpoints(2)
    result = scheduler(Profile("only", picker=Recorder())).schedule(request(), eps)
    assert result.primary == "only"
    assert isinstance(result.results["only"], ProfileResult)
    assert result.targets is result.results["only"].targets
