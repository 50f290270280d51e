"""The adapters file is checked before anything reaches the engine or the disk."""

from __future__ import annotations

import json

import pytest

from infergw.api.lora_adapters import Adapter, Unreadable, document, parse

MODELS = "/models"


def doc(*items) -> str:
    return json.dumps({"adapters": list(items)})


def entry(name="a", source="hf://org/a", path="/models/lora/a", download=True) -> dict:
    return {"name": name, "source": source, "path": path, "download": download}


def test_a_document_round_trips() -> None:
    adapters = [Adapter("a", "hf://org/a", "/models/lora/a", True), Adapter("b", "file:///b", "/b")]
    wanted, refused = parse(document(adapters), MODELS)
    assert list(wanted.values()) == adapters and refused == []


@pytest.mark.parametrize(
    "text",
    ["", "not json", "[]", '{"adapters": {}}', doc(*[entry(name=f"a{i}") for i in range(33)])],
)
def test_a_file_that_is_no_adapters_document_is_unreadable(text) -> None:
    with pytest.raises(Unreadable):
        parse(text, MODELS)


@pytest.mark.parametrize(
    ("item", "why"),
    [
        (entry(name="../etc", path="/models/lora/../etc"), "name"),
        (entry(name="a/b", path="/models/lora/a/b"), "name"),
        (entry(name=".hidden", path="/models/lora/.hidden"), "name"),
        (entry(name="a" * 257), "name"),
        (entry(name="a\nb"), "name"),
        (entry(source="ftp://example.com/a.tgz"), "source"),  # http(s): an archive, taken
        (entry(source="hf://" + "x" * 3000), "source"),
        (entry(path="/models/lora/a\x00"), "path"),
        (entry(path=""), "path"),
        (entry(path="/etc/passwd"), "downloaded adapter is loaded from /models/lora/a"),
        (entry(download="yes"), "download"),
        ("a string", "not an object"),
    ],
)
def test_hostile_entries_are_refused_one_by_one(item, why) -> None:
    wanted, refused = parse(doc(item, entry(name="ok", path="/models/lora/ok")), MODELS)
    assert list(wanted) == ["ok"]
    [r] = refused
    assert why in r.message and r.name.isprintable()


def test_a_name_given_twice_is_refused_the_second_time() -> None:
    wanted, refused = parse(doc(entry(), entry(source="hf://org/other")), MODELS)
    assert wanted["a"].source == "hf://org/a"
    assert [(r.name, r.message) for r in refused] == [("a", "given twice")]
