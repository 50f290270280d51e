"""`--picker-kv-index-keys engine`: each Model's picker is told how its engines hash blocks (block
size, hash algorithm, PYTHONHASHSEED or the simulator's --seed, each adapter's path as the runtime
sidecar loads it), read back through `infergate epp`'s own parser; a Model whose hashing the
picker cannot reproduce keeps token-id keys, and its EngineKeys condition says why."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from infergw import api
from infergw.api import engine_keys
from infergw.api.engine_keys import EngineHashSettings, NotReproducible, settings_of
from infergw.api.lora_adapters import parse
from infergw.cluster.store import CONFIG_MAP, DEPLOYMENT, SECRET
from infergw.controllers.app import build_parser
from infergw.controllers.model import ModelReconciler
from infergw.controllers.picker_objects import PickerSettings
from infergw.controllers.weights import CLUSTER
from infergw.kvindex import engine_hashing
from infergw.kvindex.engine_hashing import EngineHashing
from infergw.simulator import block_hashing
from infergw.simulator.config import build_parser as simulator_parser
from tests.controller_helpers import conds
from tests.paths import DEFAULT_MODEL
from tests.picker_cluster import Cluster, model_obj, picker_options

ENGINE = PickerSettings(kv_index_keys="engine")
SQL = {"name": "sql-lora", "artifactURL": "hf://org/sql-lora"}


async def picker_of(cluster: Cluster, tmp_path: Path, model: dict):
    """The Model's picker options and its status, reconciled with engine keys asked for."""
    cluster.reconciler = ModelReconciler(cluster.store, picker=ENGINE)
    await cluster.apply(model)
    status = await cluster.reconcile()
    tokenizer = tmp_path / "tokenizer"
    if not tokenizer.exists():
        shutil.copytree(DEFAULT_MODEL, tokenizer)
    dep = await cluster.get(DEPLOYMENT, "llama-epp")
    secret = await cluster.get(SECRET, "llama-epp-tls")
    return picker_options(dep, tokenizer, secret), status


async def test_a_vllm_models_picker_hashes_as_its_engines(cluster: Cluster, tmp_path: Path):
    model = model_obj(
        engine={"type": "vLLM", "args": ["--block-size", "32"]},
        backend={"aggregated": {"replicas": 1, "args": ["--prefix-caching-hash-algo=sha256_cbor"]}},
        env=[{"name": "PYTHONHASHSEED", "value": "7"}],
        loraAdapters=[SQL],
    )
    options, status = await picker_of(cluster, tmp_path, model)
    # The path the runtime sidecar hands vLLM's load_lora_adapter, from the file it reads.
    adapters_file = await cluster.get(CONFIG_MAP, "llama-adapters")
    models_dir = CLUSTER.models_dir(api.from_dict(status))
    loaded, refused = parse(adapters_file["data"]["adapters.json"], models_dir)
    assert refused == [] and set(loaded) == {"sql-lora"}
    assert options.kv_engine_hashing == EngineHashing(
        "sha256_cbor", "7", 32, {"sql-lora": loaded["sql-lora"].path}
    )
    assert options.kv_index_block_size == 32
    assert conds(status)["EngineKeys"]["status"] == "True"


async def test_vllm_defaults_need_no_flag_on_the_engines(cluster: Cluster, tmp_path: Path):
    options, status = await picker_of(cluster, tmp_path, model_obj())
    assert options.kv_engine_hashing == EngineHashing("sha256", None, 16, {})
    assert conds(status)["EngineKeys"]["status"] == "True"


async def test_the_simulators_seed_stands_for_pythonhashseed(cluster: Cluster, tmp_path: Path):
    model = model_obj(engine={"type": "Simulator", "args": ["--seed", "42", "--block-size=8"]})
    options, _ = await picker_of(cluster, tmp_path, model)
    assert options.kv_engine_hashing == EngineHashing("sha256", "42", 8, {})


@pytest.mark.parametrize(
    ("spec", "why"),
    [
        ({"engine": {"type": "SGLang"}}, "SGLang does not hash blocks as vLLM does"),
        (
            {"engine": {"type": "vLLM", "args": ["--prefix-caching-hash-algo", "xxhash"]}},
            "xxhash without PYTHONHASHSEED",
        ),
        (
            {"engine": {"type": "vLLM", "args": ["--prefix-caching-hash-algo", "builtin"]}},
            "'builtin' is not one the picker reproduces",
        ),
        (
            {
                "env": [
                    {
                        "name": "PYTHONHASHSEED",
                        "valueFrom": {"configMapKeyRef": {"name": "x", "key": "seed"}},
                    }
                ]
            },
            "PYTHONHASHSEED comes from a reference",
        ),
        (
            {
                "backend": {
                    "prefill": {"replicas": 1, "args": ["--block-size", "16"]},
                    "decode": {"replicas": 1, "args": ["--block-size", "32"]},
                }
            },
            "its roles hash blocks differently",
        ),
    ],
)
async def test_what_the_picker_cannot_reproduce_keeps_token_keys_and_says_why(
    cluster: Cluster, tmp_path: Path, spec: dict, why: str
):
    options, status = await picker_of(cluster, tmp_path, model_obj(**spec))
    assert options.kv_engine_hashing is None
    cond = conds(status)["EngineKeys"]
    assert (cond["status"], cond["reason"]) == ("False", "EngineHashingNotReproducible")
    assert why in cond["message"] and "token-id keys" in cond["message"]


async def test_token_keys_stay_the_default(cluster: Cluster, tmp_path: Path):
    await cluster.apply(model_obj())
    status = await cluster.reconcile()
    assert "EngineKeys" not in conds(status)
    dep = await cluster.get(DEPLOYMENT, "llama-epp")
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert not any(a.startswith("--kv-index-keys") or "--kv-engine" in a for a in args)
    parser = build_parser()
    assert parser.parse_args([]).picker_kv_index_keys == "tokens"
    assert parser.parse_args(["--picker-kv-index-keys", "engine"]).picker_kv_index_keys == "engine"
    with pytest.raises(SystemExit):
        parser.parse_args(["--picker-kv-index-keys", "hashes"])


def test_flags_read_as_argparse_reads_them():
    """The last of repeated flags wins, `--flag=V` and `--flag V` alike; a bad block size is
    refused rather than passed on."""
    found = settings_of("vLLM", "vllm/vllm-openai", [["--block-size=8", "--block-size", "64"]], {})
    assert found == EngineHashSettings(64, "sha256", None)
    bad = settings_of("vLLM", "vllm/vllm-openai", [["--block-size", "-1"]], {})
    assert isinstance(bad, NotReproducible) and "--block-size" in bad.reason
    sim = settings_of("vLLM", "ghcr.io/infergate/simulator:1", [[]], {"PYTHONHASHSEED": "5"})
    assert sim == EngineHashSettings(16, "sha256", "0")  # the simulator reads --seed only
    assert sim.picker_args() == [
        "--kv-index-keys=engine",
        "--kv-index-block-size=16",
        "--kv-engine-hash-algo=sha256",
        "--kv-engine-hash-seed=0",
    ]


def test_what_engine_keys_assume_of_the_picker_and_simulator_holds():
    """api/engine_keys.py names what the picker and the simulator implement, which it cannot
    import: their algorithms, the simulator's seed and block size defaults."""
    assert set(engine_keys.HASH_ALGOS) == set(engine_hashing.HASH_ALGOS)
    assert set(engine_keys.SIMULATOR_HASH_ALGOS) == set(block_hashing.HASH_FUNCTIONS)
    defaults = simulator_parser().parse_args([])
    assert str(defaults.seed) == engine_keys.SIMULATOR_DEFAULT_SEED
    assert defaults.block_size == engine_keys.DEFAULT_BLOCK_SIZE
