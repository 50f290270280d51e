"""Shared scoring arithmetic: lower raw value is better, scaled to 0..1 across candidates."""

from __future__ import annotations


def lower_is_better(values: list[float]) -> list[float]:
    """(max - v) / (max - min); all equal → 1 for everyone. inf (unknown/saturated) → 0."""
    finite = [v for v in values if v != float("inf")]
    if not finite:
        return [0.0] * len(values)
    lo, hi = min(finite), max(finite)
    if hi == lo:
        return [1.0 if v != float("inf") else 0.0 for v in values]
    span = hi - lo
    return [0.0 if v == float("inf") else (hi - v) / span for v in values]
