"""`--kv-index-keys engine`: the picker keys its index by the engines' block hashes, with the
engines' hashing given by flags; bad settings are refused at startup, naming the flag."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from infergw.epp.datastore import Datastore
from infergw.epp.kv_events import KVCacheView, KVEventOptions
from infergw.epp.options import parse_options
from infergw.kvindex.engine_hashing import EngineHashing, EngineKeys
from infergw.kvindex.engine_translate import EngineKeyTranslator
from infergw.kvindex.events import BlockStored
from infergw.kvindex.translate import EventTranslator
from tests.conftest import free_port

POOL = ["--pool-name", "p"]


def test_token_keys_stay_the_default():
    assert parse_options(POOL).kv_engine_hashing is None


def test_engine_keys_take_the_engines_settings():
    opts = parse_options(
        [
            *POOL,
            "--kv-index-keys",
            "engine",
            "--kv-index-block-size",
            "32",
            "--kv-engine-hash-algo",
            "sha256_cbor",
            "--kv-engine-hash-seed",
            "0",
            "--kv-engine-lora-path",
            "ad=/adapters/ad",
        ]
    )
    assert opts.kv_engine_hashing == EngineHashing(
        algo="sha256_cbor", seed="0", block_size=32, lora_paths={"ad": "/adapters/ad"}
    )


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--kv-engine-hash-seed", "0"], "need --kv-index-keys engine"),
        (["--kv-index-keys", "engine", "--kv-engine-hash-algo", "xxhash"], "PYTHONHASHSEED"),
        (["--kv-index-keys", "engine", "--kv-engine-lora-path", "ad"], "ADAPTER=PATH"),
        (["--kv-index-keys", "engine", "--kv-engine-hash-algo", "md5"], "unknown prefix-caching"),
    ],
)
def test_bad_engine_settings_are_refused(capsys, args, said):
    with pytest.raises(SystemExit):
        parse_options([*POOL, *args])
    assert said in capsys.readouterr().err


async def test_the_view_indexes_engine_hashes_and_keys_prompts_alike():
    hashing = EngineHashing(block_size=16)
    opts = KVEventOptions(
        bind=f"tcp://127.0.0.1:{free_port()}", block_size=16, engine_hashing=hashing
    )
    view = KVCacheView(Datastore(), opts, CollectorRegistry())
    try:
        assert isinstance(view.translator, EngineKeyTranslator)
        tokens = tuple(range(48))
        keys = EngineKeys(hashing).keys(tokens)
        view.translator.apply_events(
            "10.0.0.1:8000", "m", [BlockStored(tuple(keys), None, tokens, 16)]
        )
        assert view.translator.index.match_lengths(keys, ["10.0.0.1:8000"]) == {"10.0.0.1:8000": 3}
        assert view.translator.root_checks() == {"10.0.0.1:8000": (1, 0)}
    finally:
        await view.close()
    plain = KVCacheView(Datastore(), KVEventOptions(bind=f"tcp://127.0.0.1:{free_port()}"))
    try:
        assert isinstance(plain.translator, EventTranslator)
    finally:
        await plain.close()
