"""vLLM's flags that change nothing in a simulation, with vLLM's own types: accepted so that a
manifest or a `vllm serve` command line starts the simulator unchanged, said at start (a
warning each), and checked as vLLM checks them (`--tensor-parallel-size two` is an error here
too, and a misspelt flag stays an error).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass


def _json(text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


@dataclass(frozen=True, slots=True)
class VllmFlag:
    flag: str
    type: Callable[[str], object] | None  # None: a switch (store_true)
    choices: tuple[str, ...] | None = None


FLAG = VllmFlag
# Grouped as vLLM's --help groups them; values as vLLM types them.
IGNORED = (
    # model and weights
    FLAG("--dtype", str, ("auto", "half", "float16", "bfloat16", "float", "float32")),
    FLAG("--quantization", str),
    FLAG("--revision", str),
    FLAG("--code-revision", str),
    FLAG("--tokenizer-revision", str),
    FLAG("--tokenizer-mode", str, ("auto", "slow", "mistral", "custom")),
    FLAG("--load-format", str),
    FLAG("--download-dir", str),
    FLAG("--trust-remote-code", None),
    FLAG("--hf-overrides", _json),
    FLAG("--generation-config", str),
    FLAG("--override-generation-config", _json),
    FLAG("--max-seq-len-to-capture", _positive_int),
    # parallelism and memory
    FLAG("--tensor-parallel-size", _positive_int),
    FLAG("--pipeline-parallel-size", _positive_int),
    FLAG("--data-parallel-size", _positive_int),
    FLAG("--distributed-executor-backend", str, ("ray", "mp", "uni", "external_launcher")),
    FLAG("--gpu-memory-utilization", _non_negative_float),
    FLAG("--swap-space", _non_negative_float),
    FLAG("--cpu-offload-gb", _non_negative_float),
    FLAG("--kv-cache-dtype", str),
    FLAG("--enforce-eager", None),
    FLAG("--disable-custom-all-reduce", None),
    FLAG("--enable-sleep-mode", None),
    FLAG("--compilation-config", _json),
    # scheduling
    FLAG("--enable-chunked-prefill", None),
    FLAG("--scheduling-policy", str, ("fcfs", "priority")),
    FLAG("--async-scheduling", None),
    FLAG("--speculative-config", _json),
    # LoRA
    FLAG("--max-lora-rank", _positive_int),
    FLAG("--max-cpu-loras", _positive_int),
    FLAG("--lora-dtype", str),
    FLAG("--fully-sharded-loras", None),
    # multimodal
    FLAG("--limit-mm-per-prompt", _json),
    # the OpenAI server
    FLAG("--chat-template", str),
    FLAG("--response-role", str),
    FLAG("--enable-auto-tool-choice", None),
    FLAG("--tool-call-parser", str),
    FLAG("--reasoning-parser", str),
    FLAG("--uvicorn-log-level", str, ("debug", "info", "warning", "error", "critical", "trace")),
    FLAG("--disable-frontend-multiprocessing", None),
    FLAG("--disable-log-requests", None),
    FLAG("--enable-log-requests", None),
    FLAG("--disable-log-stats", None),
    FLAG("--max-log-len", _positive_int),
    FLAG("--root-path", str),
    FLAG("--allowed-origins", _json),
    # multi-node: the simulator is one node whatever they say (--headless is read: a worker
    # node serves nothing)
    FLAG("--nnodes", _positive_int),
    FLAG("--node-rank", int),
    FLAG("--master-addr", str),
    FLAG("--master-port", int),
)


def add_ignored_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "vLLM flags that change nothing here (accepted with a warning, checked as vLLM does)"
    )
    for f in IGNORED:
        dest = "vllm_" + f.flag.removeprefix("--").replace("-", "_")
        if f.type is None:
            g.add_argument(f.flag, dest=dest, action="store_true")
        else:
            g.add_argument(f.flag, dest=dest, type=f.type, choices=f.choices, metavar="VALUE")


def ignored_given(args: argparse.Namespace) -> list[str]:
    """The ignored flags the command line set, for the start-up warning."""
    given = []
    for f in IGNORED:
        value = getattr(args, "vllm_" + f.flag.removeprefix("--").replace("-", "_"))
        if value not in (None, False):
            given.append(f.flag if value is True else f"{f.flag}={value}")
    return given
