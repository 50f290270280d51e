"""Envoy's own check of a rendered config (`envoy --mode validate`), for tests that render one."""

from __future__ import annotations

import subprocess
from pathlib import Path

from infergw.stack.local import envoy_binary


def assert_envoy_accepts(path: Path) -> None:
    done = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path), "--log-level", "error"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
