"""The names the simulator answers to: served names, start-up and run-time LoRA adapters."""

from __future__ import annotations

import pytest

from infergw.simulator.config import LoraModule, SimulatorConfig
from infergw.simulator.protocol import ApiError
from infergw.simulator.served_models import ServedModels


def served(**kw) -> ServedModels:
    return ServedModels(SimulatorConfig(model="m", served_model_name=["a", "b"], **kw))


def test_every_served_name_and_no_name_resolve_to_the_base_model():
    models = served()
    assert models.resolve("b") == ("b", None)
    assert models.resolve(None) == ("a", None)


def test_an_unknown_name_is_a_404_naming_the_model():
    with pytest.raises(ApiError) as err:
        served().resolve("nope")
    assert err.value.status == 404 and err.value.param == "model" and "nope" in err.value.message


def test_adapter_ids_start_at_one_and_are_never_reused():
    models = served(lora_modules=[LoraModule("sql", "/a/sql")])
    assert models.resolve("sql")[1].lora_id == 1
    assert models.remove_lora("sql") and not models.remove_lora("sql")
    assert models.add_lora("sql", "/a/sql2").lora_id == 2


def test_cards_list_the_base_names_then_the_adapters_with_their_parent():
    models = served(lora_modules=[LoraModule("sql", "/a/sql")])
    cards = models.cards(max_model_len=64)
    assert [(c["id"], c["parent"], c["max_model_len"]) for c in cards] == [
        ("a", None, 64),
        ("b", None, 64),
        ("sql", "a", None),
    ]
