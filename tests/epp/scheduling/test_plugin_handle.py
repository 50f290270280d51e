"""Plugins get a typed handle at construction: the registry's factories hand each plugin the
KV cache, the picker's metrics and the config's plugins by name, and a plugin type says
whether it needs the KV cache before any plugin is built."""

from __future__ import annotations

import pytest

from infergw.epp.metrics import PickerMetrics
from infergw.epp.scheduling import registry
from infergw.epp.scheduling.config import (
    DEFAULT_CONFIG,
    ConfigError,
    load_config,
    needs_kv_cache,
    read_config,
)
from infergw.epp.scheduling.handle import Handle
from infergw.epp.scheduling.plugins.pd_profile_handler import PDProfileHandler
from infergw.epp.scheduling.plugins.precise_prefix_cache import PrecisePrefixCacheScorer
from infergw.kvindex.cache import KVCache
from infergw.kvindex.index import KVBlockIndex
from infergw.kvindex.tokenize import PromptTokenizers
from tests.director_fixtures import HEAD, PRECISE

# The handler comes first: the prefix scorers it asks are built after it.
PD_FIRST = (
    HEAD
    + """\
plugins:
- {type: pd-profile-handler, parameters: {nonCachedTokens: 16}}
- type: decode-filter
- type: prefill-filter
- {name: approx, type: prefix-cache-scorer}
- type: precise-prefix-cache-scorer
schedulingProfiles:
- name: decode
  plugins: [{pluginRef: decode-filter}, {pluginRef: approx}]
- name: prefill
  plugins: [{pluginRef: prefill-filter}, {pluginRef: precise-prefix-cache-scorer}]
"""
)


def kv_cache() -> KVCache:
    return KVCache(tokenizers=PromptTokenizers({}), index=KVBlockIndex())


def test_only_a_plugin_type_that_takes_the_kv_cache_asks_for_it():
    assert [t for t, cls in registry.PLUGIN_TYPES.items() if cls.needs_kv_cache] == [
        "precise-prefix-cache-scorer"
    ]
    assert needs_kv_cache(read_config(PRECISE)) is True
    assert needs_kv_cache(read_config(DEFAULT_CONFIG)) is False
    assert needs_kv_cache(read_config(None)) is False
    assert needs_kv_cache(read_config(PD_FIRST)) is True
    # An unknown type asks for nothing; building the plugins refuses it.
    unknown = PRECISE.replace("precise-prefix-cache-scorer", "no-such-scorer")
    assert needs_kv_cache(read_config(unknown)) is False
    with pytest.raises(ConfigError, match="unknown plugin type 'no-such-scorer'"):
        load_config(unknown)


def test_read_config_checks_the_shape_before_any_plugin_is_built():
    with pytest.raises(ConfigError, match="kind must be EndpointPickerConfig"):
        read_config("kind: Other\napiVersion: v1\n")
    # A bad parameter is the plugin's to refuse, when it is built.
    bad = PRECISE.replace(
        "- type: precise-prefix-cache-scorer\n",
        "- {type: precise-prefix-cache-scorer, parameters: {tierWeights: {gpu: 2}}}\n",
    )
    assert needs_kv_cache(read_config(bad)) is True
    with pytest.raises(ConfigError, match="tierWeights"):
        load_config(bad)


def test_the_kv_cache_reaches_the_plugin_through_its_factory():
    kv = kv_cache()
    scorer = load_config(PRECISE, Handle(kv_cache=kv)).plugins["precise-prefix-cache-scorer"]
    assert isinstance(scorer, PrecisePrefixCacheScorer) and scorer.kv is kv
    # Without one the scorer is still built; it knows no prompt and scores every pod 0.
    assert load_config(PRECISE).plugins["precise-prefix-cache-scorer"].kv is None
    made = registry.create("precise-prefix-cache-scorer", "p", {}, Handle(kv_cache=kv))
    assert made.kv is kv


def test_the_pd_handler_finds_prefix_sources_built_after_it():
    cfg = load_config(PD_FIRST, Handle(kv_cache=kv_cache()))
    handler = cfg.handler
    assert isinstance(handler, PDProfileHandler)
    assert [p.name for p in handler.sources] == ["precise-prefix-cache-scorer", "approx"]
    assert handler.debug()["cacheSources"] == ["precise-prefix-cache-scorer", "approx"]
    named = PD_FIRST.replace("nonCachedTokens: 16}", "nonCachedTokens: 16, prefixScorer: approx}")
    assert [p.name for p in load_config(named).handler.sources] == ["approx"]


def test_each_config_has_its_own_plugin_table():
    """One handle's services serve two configs; their plugins never meet."""
    handle = Handle(metrics=PickerMetrics())
    a = load_config(PD_FIRST, handle)
    b = load_config(PD_FIRST, handle)
    assert a.handler.sources and b.handler.sources
    assert not {id(p) for p in a.handler.sources} & {id(p) for p in b.handler.sources}
    assert dict(handle.plugins) == {}  # the caller's handle is not filled in


def test_plugins_cannot_change_the_table_they_are_given():
    seen = []

    class Spy(registry.PLUGIN_TYPES["queue-scorer"]):
        @classmethod
        def create(cls, name, params, handle):
            seen.append(handle)
            return cls(name, params)

    registry.PLUGIN_TYPES["spy"] = Spy
    try:
        load_config(
            HEAD
            + "plugins: [{type: queue-scorer}, {type: spy}]\n"
            + "schedulingProfiles: [{name: p, plugins: [{pluginRef: spy}]}]\n"
        )
    finally:
        del registry.PLUGIN_TYPES["spy"]
    (handle,) = seen
    assert list(handle.plugins) == ["queue-scorer", "spy"]  # complete once the config is built
    with pytest.raises(TypeError):
        handle.plugins["x"] = None  # type: ignore[index]
