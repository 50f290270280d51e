"""The real-engine tests (tests/real_engine/, marker `vllm`) stay out of every run that does
not ask for them, and skip, saying why, when asked for without a vLLM: `make test` never
needs one, `make test-vllm` (and CI through it) always runs them."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.paths import ROOT
from tests.real_engine.vllm_stack import VLLM_BIN_ENV


def pytest_run(*args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != VLLM_BIN_ENV}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done.stdout + done.stderr


def test_a_run_that_does_not_ask_for_them_leaves_them_out() -> None:
    out = pytest_run("--collect-only", "-q", "tests/real_engine")
    assert "test_vllm_real.py::" not in out, out
    assert "deselected" in out, out


def test_asked_for_without_vllm_they_skip_naming_what_is_missing() -> None:
    out = pytest_run("-m", "vllm", "-rs", "tests/real_engine")
    assert "skipped" in out and "passed" not in out and "failed" not in out, out
    assert f"{VLLM_BIN_ENV} is not set" in out, out
