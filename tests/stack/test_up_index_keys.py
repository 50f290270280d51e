"""`infergate up --kv-index-keys engine`: each pool's pickers get its Model's hashing (read back
through `infergate epp`'s own parser), a Model the picker cannot hash alike keeps token ids and
the stack says why; the stack's own simulator pods share one seed in this mode."""

from __future__ import annotations

import shutil

import yaml

from infergw.epp.options import parse_options
from infergw.kvindex.engine_hashing import EngineHashing
from infergw.simulator.config import build_parser as simulator_parser
from infergw.stack.example import Example
from infergw.stack.local import LocalStack, StackConfig
from infergw.stack.ports import free_stack_ports
from infergw.up import build_parser, stack_config
from tests.paths import ROOT

QUICKSTART = ROOT / "examples" / "quickstart"


def picker_options(stack: LocalStack, index: int = 0):
    return parse_options(["--pool-name", "x", *stack.picker_args(index)])


def test_up_keys_the_quickstart_by_its_simulators_hashes(tmp_path) -> None:
    argv = ["--kv-index-keys", "engine"]
    cfg = stack_config(build_parser().parse_args(argv), Example.read(QUICKSTART), tmp_path)
    lines: list[str] = []
    cfg.progress = lines.append
    stack = LocalStack(cfg)
    # The quickstart's Simulator pods: no --seed (the simulator's 0), vLLM's defaults.
    assert picker_options(stack).kv_engine_hashing == EngineHashing("sha256", "0", 16, {})
    stack.say_index_keys()
    assert lines == [
        "  KV index of 'quickstart': keyed by engine hashes: --kv-index-block-size=16 "
        "--kv-engine-hash-algo=sha256 --kv-engine-hash-seed=0"
    ]
    default = stack_config(build_parser().parse_args([]), Example.read(QUICKSTART), tmp_path)
    assert picker_options(LocalStack(default)).kv_engine_hashing is None


def test_a_model_the_picker_cannot_hash_alike_keeps_token_keys(tmp_path) -> None:
    example = tmp_path / "example"
    shutil.copytree(QUICKSTART, example)
    model = yaml.safe_load((example / "model.yaml").read_text())
    model["spec"]["engine"]["args"] += ["--prefix-caching-hash-algo", "xxhash"]
    (example / "model.yaml").write_text(yaml.safe_dump(model))
    args = build_parser().parse_args(["--kv-index-keys", "engine"])
    cfg = stack_config(args, Example.read(example), tmp_path / "run")
    lines: list[str] = []
    cfg.progress = lines.append
    stack = LocalStack(cfg)
    assert picker_options(stack).kv_engine_hashing is None
    stack.say_index_keys()
    assert len(lines) == 1 and "keeps token-id keys" in lines[0] and "'xxhash'" in lines[0]


def test_fixed_simulator_pods_share_one_seed_keyed_by_engine_hashes(tmp_path) -> None:
    def stack(keys: str, sim_args: list[str]) -> LocalStack:
        ports = free_stack_ports(pods=2)
        cfg = StackConfig(
            tmp_path / keys, pods=2, ports=ports, kv_index_keys=keys, sim_args=sim_args
        )
        return LocalStack(cfg)

    def seeds(s: LocalStack) -> list[str]:
        return [
            simulator_parser().parse_args(s.pod_command_line(rank, port)[3:]).seed
            for rank, port in enumerate(s.pod_ports)
        ]

    engine = stack("engine", ["--block-size", "32"])
    assert seeds(engine) == [0, 0]
    assert picker_options(engine).kv_engine_hashing == EngineHashing("sha256", "0", 32, {})
    tokens = stack("tokens", [])
    assert seeds(tokens) == tokens.pod_ports  # each answers its own way, as before
