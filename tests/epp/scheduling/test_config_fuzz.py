"""Fuzz: EndpointPickerConfig documents. Every document either loads or raises ConfigError
naming what is wrong, never another exception: mutations of a config that uses every plugin
type (values of every type at every place, keys added and removed), and random YAML text."""

from __future__ import annotations

import copy
import random
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from infergw.epp.scheduling.config import ConfigError, build, load_config
from tests.fuzzing import fuzz_settings

pytestmark = pytest.mark.fuzz

BASE: dict[str, Any] = {
    "apiVersion": "inference.networking.x-k8s.io/v1alpha1",
    "kind": "EndpointPickerConfig",
    "featureGates": ["flowControl"],
    "plugins": [
        {"type": "queue-scorer"},
        {"type": "kv-cache-utilization-scorer"},
        {"type": "running-requests-scorer"},
        {"type": "least-request", "parameters": {"by": "tokens"}},
        {"type": "low-queue-filter", "parameters": {"threshold": 8}},
        {"type": "least-latency-scorer", "parameters": {"maxOutputTokens": 128}},
        {"type": "lora-affinity-filter"},
        {"type": "lora-affinity-scorer"},
        {
            "type": "prefix-cache-scorer",
            "parameters": {
                "blockSizeTokens": 16,
                "maxPrefixBlocksToMatch": 64,
                "lruCapacityPerServer": 1000,
            },
        },
        {
            "type": "precise-prefix-cache-scorer",
            "parameters": {"tierWeights": {"gpu": 1, "cpu": 0.5}, "speculativeIndexing": True},
        },
        {"type": "session-affinity-scorer", "parameters": {"ttlSeconds": 60, "maxSessions": 10}},
        {"type": "random-scorer", "parameters": {"seed": 3}},
        {"name": "picker", "type": "weighted-random-picker", "parameters": {"seed": 1}},
        {"type": "decode-filter", "parameters": {"allowUnlabeled": True}},
        {"type": "prefill-filter", "parameters": {"label": "role"}},
        {
            "type": "pd-profile-handler",
            "parameters": {"nonCachedTokens": 16, "historySize": 10},
        },
    ],
    "schedulingProfiles": [
        {
            "name": "decode",
            "plugins": [
                {"pluginRef": "decode-filter"},
                {"pluginRef": "queue-scorer", "weight": 2},
                {"pluginRef": "prefix-cache-scorer", "weight": 3},
                {"pluginRef": "precise-prefix-cache-scorer"},
                {"pluginRef": "session-affinity-scorer", "weight": 0.5},
                {"pluginRef": "picker"},
            ],
        },
        {
            "name": "prefill",
            "plugins": [
                {"pluginRef": "prefill-filter"},
                {"pluginRef": "least-request"},
                {"pluginRef": "low-queue-filter"},
                {"pluginRef": "least-latency-scorer"},
                {"pluginRef": "lora-affinity-filter"},
                {"pluginRef": "lora-affinity-scorer"},
                {"pluginRef": "random-scorer"},
                {"pluginRef": "kv-cache-utilization-scorer"},
                {"pluginRef": "running-requests-scorer"},
            ],
        },
    ],
}

# Values of every YAML type, the bounds' edges and beyond.
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([0, -1, 1, 2**63, -(2**63) - 1, 10**40]),
    st.floats(),
    st.sampled_from([0.5, -1e30, float("inf"), float("-inf"), float("nan")]),
    st.text(max_size=12),
    st.sampled_from(["queue-scorer", "decode", "prefill", "picker", "pd-profile-handler"]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)


def places(doc: Any, path: tuple = ()) -> list[tuple]:
    """Every path to a value in doc (the document itself is ())."""
    out = [path]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += places(v, (*path, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += places(v, (*path, i))
    return out


def mutate(doc: Any, rng: random.Random, values: list[Any]) -> Any:
    path = rng.choice(places(doc))
    value = copy.deepcopy(rng.choice(values))
    if not path:
        return value
    parent = doc
    for step in path[:-1]:
        parent = parent[step]
    action = rng.randrange(4)
    if action == 0 and isinstance(parent, dict):
        del parent[path[-1]]
    elif action == 1 and isinstance(parent, dict):
        parent[rng.choice(["parameters", "weight", "name", "type", "pluginRef", "x"])] = value
    elif action == 2 and isinstance(parent, list):
        parent.insert(path[-1], value)
    else:
        parent[path[-1]] = value
    return doc


def builds_or_config_error(doc: Any) -> None:
    try:
        build(doc)
    except ConfigError as exc:
        assert str(exc) and "`$" not in str(exc)  # msgspec's paths are translated


def loads_or_config_error(doc: Any) -> None:
    """The same document through YAML text and load_config (the picker's own path)."""
    try:
        text = yaml.safe_dump(doc)
    except yaml.YAMLError:
        return
    try:
        load_config(text)
    except ConfigError as exc:
        assert str(exc)


def test_the_base_document_loads():
    assert set(build(copy.deepcopy(BASE)).profiles) == {"decode", "prefill"}


@fuzz_settings(150)
@given(
    values=st.lists(VALUES, min_size=1, max_size=8),
    rng=st.randoms(use_true_random=False),
    mutations=st.integers(1, 4),
)
def test_mutated_documents_load_or_raise_config_error(values, rng, mutations):
    """20 documents an example (3000 in the suite), each with a few mutations; the last
    one also as YAML text (PyYAML is slow: once an example is enough)."""
    for _ in range(20):
        doc = copy.deepcopy(BASE)
        for _ in range(mutations):
            doc = mutate(doc, rng, values)
        builds_or_config_error(copy.deepcopy(doc))
    loads_or_config_error(doc)


YAML_PIECES = st.sampled_from(
    [
        "plugins:",
        "- type: prefix-cache-scorer",
        "  parameters: {blockSizeTokens: .inf}",
        "  parameters: {lruCapacityPerServer: -1}",
        "schedulingProfiles: [{name: d, plugins: [{pluginRef: prefix-cache-scorer}]}]",
        "kind: EndpointPickerConfig",
        "apiVersion: inference.networking.x-k8s.io/v1alpha1",
        "&a [*a]",
        "? [1]: 2",
        "[" * 100,
        "!!python/object:os.system",
        "weight: .nan",
        "\t",
        "---",
    ]
)


@fuzz_settings(100)
@given(lines=st.lists(YAML_PIECES | st.text(max_size=20), max_size=12))
def test_yaml_text_loads_or_raises_config_error(lines):
    try:
        load_config("\n".join(lines))
    except ConfigError:
        pass


def test_yaml_nested_past_the_recursion_limit_is_a_config_error():
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_config("[" * 5000)
