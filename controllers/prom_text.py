"""Reading Prometheus text exposition: what the autoscaler needs of the pods' and the
pickers' /metrics."""

from __future__ import annotations

import math


def parse_sum(text: str, names: set[str]) -> dict[str, float]:
    """Sum each wanted metric's samples (gauges and counters) in Prometheus text."""
    out = dict.fromkeys(names, 0.0)
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in out:
            # The value follows the labels; an optional timestamp may follow the value.
            fields = line[line.rfind("}") + 1 :].split() if "{" in line else line.split()[1:]
            try:
                value = float(fields[0])
            except (IndexError, ValueError):
                continue
            if math.isfinite(value):  # NaN or Inf would poison the sum and the scale
                out[name] += value
    return out
