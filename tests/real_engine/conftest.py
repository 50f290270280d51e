"""One real-vLLM stack for every real-engine test module: two vLLMs take minutes to start on
two cores, so the suite starts them once (`infergate up` of vllm_stack.py's Model, LoRA on)."""

from __future__ import annotations

import pytest

from infergw.stack.pods import pool_pods
from tests.real_engine.vllm_stack import Up, engine_pids, start_up, vllm_bin, write_model_dir


@pytest.fixture(scope="session")
def up(tmp_path_factory) -> Up:
    bin_dir = vllm_bin()
    base = tmp_path_factory.mktemp("vllm")
    running = start_up(write_model_dir(base / "example"), base / "run", bin_dir)
    pods: set[str] = set()  # every pod address the stack used, replacements too
    try:
        pods |= {p.ip for p in pool_pods(running.pool_file(), "tiny")}
        yield running
    finally:
        pods |= {p.ip for p in pool_pods(running.pool_file(), "tiny")}
        code = running.stop()
        print(running.output)
    # Ctrl-C stopped every engine the stack started, and their children with them.
    assert code == 0, running.output
    assert not any(engine_pids(ip) for ip in pods), "vLLM processes outlived `infergate up`"
