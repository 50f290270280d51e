"""Plugin parameters are typed and bounded: a config that breaks one is refused at start, by
load_config and by the real `python -m infergw.epp`, with an error naming the plugin and the
parameter."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from infergw.epp.scheduling.config import ConfigError, load_config
from infergw.epp.scheduling.registry import PLUGIN_TYPES, create
from tests.conftest import free_port
from tests.picker_fixtures import Picker


def config(plugin_type: str, params: object, extra: str = "") -> str:
    doc = {
        "apiVersion": "inference.networking.x-k8s.io/v1alpha1",
        "kind": "EndpointPickerConfig",
        "plugins": [{"name": "the-plugin", "type": plugin_type, "parameters": params}],
        "schedulingProfiles": [{"name": "default", "plugins": [{"pluginRef": "the-plugin"}]}],
    }
    return yaml.safe_dump(doc) + extra


INF, NAN = float("inf"), float("nan")

BAD = [
    ("session-affinity-scorer", {"maxSessions": -1}, "maxSessions"),
    ("session-affinity-scorer", {"maxSessions": 0}, "maxSessions"),
    ("session-affinity-scorer", {"ttlSeconds": INF}, "ttlSeconds"),
    ("session-affinity-scorer", {"ttlSeconds": NAN}, "ttlSeconds"),
    ("session-affinity-scorer", {"ttlSeconds": -5}, "ttlSeconds"),
    ("session-affinity-scorer", {"maxSesions": 5}, "maxSesions"),  # a typo is not ignored
    ("prefix-cache-scorer", {"lruCapacityPerServer": -1}, "lruCapacityPerServer"),
    ("prefix-cache-scorer", {"lruCapacityPerServer": 10**30}, "lruCapacityPerServer"),
    ("prefix-cache-scorer", {"blockSizeTokens": 0}, "blockSizeTokens"),
    ("prefix-cache-scorer", {"blockSizeTokens": 0.5}, "blockSizeTokens"),
    ("prefix-cache-scorer", {"blockSizeTokens": -1e30}, "blockSizeTokens"),
    ("prefix-cache-scorer", {"blockSizeTokens": INF}, "blockSizeTokens"),
    ("prefix-cache-scorer", {"blockSizeTokens": "16"}, "blockSizeTokens"),
    ("prefix-cache-scorer", {"blockSizeTokens": True}, "blockSizeTokens"),
    ("prefix-cache-scorer", {"maxPrefixBlocksToMatch": -3}, "maxPrefixBlocksToMatch"),
    ("precise-prefix-cache-scorer", {"tierWeights": {"gpu": INF}}, "tierWeights"),
    ("precise-prefix-cache-scorer", {"tierWeights": {"gpu": NAN}}, "tierWeights"),
    ("precise-prefix-cache-scorer", {"tierWeights": [1]}, "tierWeights"),
    ("precise-prefix-cache-scorer", {"speculativeIndexing": "false"}, "speculativeIndexing"),
    ("low-queue-filter", {"threshold": NAN}, "threshold"),
    ("low-queue-filter", {"threshold": -INF}, "threshold"),
    ("least-latency-scorer", {"maxOutputTokens": -1}, "maxOutputTokens"),
    ("least-latency-scorer", {"maxOutputTokens": INF}, "maxOutputTokens"),
    ("least-request", {"by": "bytes"}, "by"),
    ("max-score-picker", {"seed": -1}, "seed"),
    ("random-scorer", {"seed": 0.5}, "seed"),
    ("decode-filter", {"label": ""}, "label"),
    ("prefill-filter", {"allowUnlabeled": "yes"}, "allowUnlabeled"),
    ("queue-scorer", {"weight": 2}, "takes no parameters"),
]


@pytest.mark.parametrize(("plugin_type", "params", "named"), BAD)
def test_bad_parameters_are_refused_naming_plugin_and_parameter(plugin_type, params, named):
    with pytest.raises(ConfigError) as err:
        load_config(config(plugin_type, params))
    message = str(err.value)
    assert "the-plugin" in message and plugin_type in message and named in message


def test_the_pd_handler_checks_its_parameters_too():
    with pytest.raises(ConfigError, match=r"historySize: expected `int` >= 0, got -1"):
        load_config(config("pd-profile-handler", {"nonCachedTokens": 8, "historySize": -1}))


@pytest.mark.parametrize("weight", [INF, NAN, -1, True, "2", 1e300])
def test_bad_weights_are_refused(weight):
    doc = yaml.safe_load(config("queue-scorer", None))
    doc["schedulingProfiles"][0]["plugins"][0]["weight"] = weight
    with pytest.raises(ConfigError, match="weight"):
        load_config(yaml.safe_dump(doc))


def test_every_plugin_but_pd_is_made_with_its_defaults():
    for plugin_type in sorted(set(PLUGIN_TYPES) - {"pd-profile-handler"}):  # needs a threshold
        assert create(plugin_type, plugin_type, {}).name == plugin_type
        assert create(plugin_type, plugin_type, None).name == plugin_type


def test_the_picker_refuses_a_bad_parameter_at_start(tmp_path):
    """The real `python -m infergw.epp`: exits non-zero at once, naming the plugin and parameter."""
    picker = Picker(tmp_path, [free_port()])
    (tmp_path / "config.yaml").write_text(config("prefix-cache-scorer", {"blockSizeTokens": -1e30}))
    try:
        done = subprocess.run(picker.cmd, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the picker started with blockSizeTokens: -1e30")
    assert done.returncode != 0
    assert "the-plugin" in done.stderr and "prefix-cache-scorer" in done.stderr
    assert "blockSizeTokens" in done.stderr
