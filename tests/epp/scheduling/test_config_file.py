"""The EndpointPickerConfig shape (msgspec Structs): msgspec's errors reach the operator in
the picker's own wording, prefixed with where in the document the fault is."""

from __future__ import annotations

import pytest

from infergw.epp.scheduling.config import ConfigError, build

HEADER = {"apiVersion": "llm-d.ai/v1alpha1", "kind": "EndpointPickerConfig"}
PROFILE = [{"name": "p", "plugins": [{"pluginRef": "queue-scorer"}]}]


def error(doc: dict) -> str:
    with pytest.raises(ConfigError) as err:
        build(
            {**HEADER, "plugins": [{"type": "queue-scorer"}], "schedulingProfiles": PROFILE, **doc}
        )
    return str(err.value)


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({5: 1}, "EndpointPickerConfig: every key must be a string"),
        (
            {"plugins": [{"type": "least-request", "parameters": {1: "x"}}]},
            "plugins[0].parameters: every key must be a string",
        ),
        ({"plugins": [{"type": "queue-scorer", "name": 3}]}, "plugins[0]: name must be a string"),
        ({"schedulingProfiles": [{"name": ""}]}, "schedulingProfiles[0] needs a 'name' (a string)"),
        (
            {
                "schedulingProfiles": [
                    {"name": "p", "plugins": [{"pluginRef": "queue-scorer", "weight": "2"}]}
                ]
            },
            "schedulingProfiles[0].plugins[0]: weight must be a number in 0..1000000, got '2'",
        ),
        (
            {"schedulingProfiles": [{"name": "p", "plugins": [{"weight": 1}]}]},
            "schedulingProfiles[0].plugins[0]: pluginRef None names no plugin",
        ),
        ({"featureGates": {"a": 1}}, "featureGates must be a list"),
        ({"kind": 5}, "kind must be EndpointPickerConfig, got 5"),
    ],
)
def test_shape_errors_say_where_in_the_operators_words(doc, message):
    assert error(doc) == message


def test_no_message_leaks_msgspecs_path_syntax():
    docs = [{"plugins": v} for v in ([[1]], [{"type": []}], [{"type": "x", "parameters": 1}])]
    docs += [{"schedulingProfiles": v} for v in (1, [1], [{"name": "p", "plugins": [[]]}])]
    for doc in docs:
        assert "$" not in error(doc)


def test_an_empty_plugin_name_defaults_to_the_type_and_other_keys_pass_through():
    cfg = build(
        {
            **HEADER,
            "plugins": [{"type": "queue-scorer", "name": ""}],
            "schedulingProfiles": PROFILE,
            "users": {"alice": {}},  # read by epp.trust, not by build
        }
    )
    assert list(cfg.plugins) == ["queue-scorer"]
