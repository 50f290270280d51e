"""The simulator takes vLLM's command line: `serve MODEL` with a positional model, a Hugging
Face model id, vLLM's flags with vLLM's types (those that change nothing in a simulation are
accepted and said at start), a bare LoRA name; a misspelt flag or a bad value stays an error."""

from __future__ import annotations

import json
import sys
import urllib.request

import pytest

from infergw.simulator.config import parse_config
from infergw.simulator.vllm_flags import IGNORED
from tests.conftest import free_port, running
from tests.paths import TINY_MODEL

MODEL_ID = "meta-llama/Llama-3.1-8B-Instruct"
# A command line of vLLM's own docs and charts (the model id, tool calling, LoRA, TP).
VLLM_LINE = [
    "serve",
    MODEL_ID,
    "--tensor-parallel-size",
    "1",
    "--gpu-memory-utilization",
    "0.9",
    "--max-model-len",
    "4096",
    "--enable-auto-tool-choice",
    "--tool-call-parser",
    "llama3_json",
    "--enable-lora",
    "--max-cpu-loras",
    "4",
    "--lora-modules",
    "sql-lora",
    "--dtype",
    "bfloat16",
]


def test_vllm_serve_with_a_model_id_starts_and_says_what_it_does_not_simulate():
    cfg = parse_config(VLLM_LINE)
    assert cfg.model is None and cfg.model_id == MODEL_ID and cfg.model_name == MODEL_ID
    assert cfg.max_model_len == 4096 and cfg.enable_lora
    assert [m.name for m in cfg.lora_modules] == ["sql-lora"]
    said = "\n".join(cfg.warnings)
    for flag in ("--tensor-parallel-size=1", "--enable-auto-tool-choice", "--max-cpu-loras=4"):
        assert flag in said, flag
    assert "simulator's own tokenizer" in said


def test_a_local_model_directory_is_its_tokenizer():
    cfg = parse_config([str(TINY_MODEL)])
    assert cfg.model == str(TINY_MODEL) and cfg.model_id is None and not cfg.warnings


@pytest.mark.parametrize(
    "argv",
    [
        ["--tensor-paralel-size", "2"],  # misspelt
        ["--tensor-parallel-size", "two"],
        ["--tensor-parallel-size", "0"],
        ["--dtype", "fp7"],
        ["--hf-overrides", "{not json"],
        ["--gpu-memory-utilization", "-1"],
        ["--lora-modules", "=x"],
        ["./no/such/dir"],
        ["--model", "/no/such/dir"],
    ],
)
def test_what_vllm_refuses_is_refused(argv):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(argv)
    assert exit_info.value.code == 2


def test_every_ignored_flag_parses_with_a_value_of_its_type():
    for f in IGNORED:
        value = (
            []
            if f.type is None
            else [f.choices[0] if f.choices else {"_json": "{}"}.get(f.type.__name__, "1")]
        )
        cfg = parse_config([f.flag, *value])
        assert any(w.startswith(f.flag) for w in cfg.warnings), f.flag


def test_a_simulator_started_as_vllm_serve_serves_the_model_id(tmp_path):
    port = free_port()
    log = tmp_path / "sim.log"
    cmd = [sys.executable, "-m", "infergw.simulator", *VLLM_LINE, "--port", str(port)]
    with running(cmd, ready_url=f"http://127.0.0.1:{port}/health", output=log):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as r:
            ids = [m["id"] for m in json.load(r)["data"]]
    assert ids[0] == MODEL_ID and "sql-lora" in ids
    text = log.read_text()
    assert "--max-cpu-loras=4 is accepted and changes nothing" in text
