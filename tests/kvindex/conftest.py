"""Fixtures the KV-index tests share."""

from __future__ import annotations

import pytest

from tests.kv_subscriber import Subscriber


@pytest.fixture
def subscriber():
    """A SUB socket a simulator's KV events are published to (vLLM's central mode)."""
    s = Subscriber()
    yield s
    s.close()
