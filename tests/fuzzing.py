"""One knob for every property and fuzz suite: the fast suite runs each with a bounded
budget; `make fuzz` (INFERGATE_FUZZ=1) multiplies it for a longer search."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

FUZZ_FACTOR = 10 if os.environ.get("INFERGATE_FUZZ") == "1" else 1


def examples(n: int) -> int:
    """How many examples (or inputs) a suite tries: n in the suite, FUZZ_FACTOR × n under
    `make fuzz`."""
    return n * FUZZ_FACTOR


def fuzz_settings(n: int) -> settings:
    """Hypothesis settings for a fuzz suite of n examples: no deadline (machines are
    noisy) and no complaint about slow generation of large inputs."""
    return settings(
        max_examples=examples(n),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
