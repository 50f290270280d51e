"""One benchmark point: a fresh fleet in one mode, the trace at one rate. Requests that arrive
during the warm-up are sent but not counted; the engines' and sidecars' counters cover only the
measured part. Failures are counted, never dropped."""

from __future__ import annotations

import asyncio
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from infergw.bench.client import run_trace
from infergw.bench.common import percentile
from infergw.bench.pd.client import Outcome, send
from infergw.bench.pd.fleet import Tuning, new_stack, snapshot
from infergw.bench.pd.workload import DECODE, LONG, Mix
from infergw.bench.routing.slo import Slo


@dataclass(slots=True)
class Settings:
    warmup_s: float
    duration_s: float
    seed: int
    mix: Mix
    tuning: Tuning = field(default_factory=Tuning)
    slo: Slo = field(default_factory=Slo)


def run_point(mode: str, rate: float, s: Settings, on_request=None) -> dict:
    trace = s.mix.trace(rate, s.warmup_s + s.duration_s, s.seed)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"infergate-bench-pd-{mode}-") as tmp:
        with new_stack(mode, Path(tmp), s.tuning) as stack:
            row = asyncio.run(_measure(stack, trace, s, on_request))
    return (
        {"mode": mode, "rate": rate, "sent": len(trace)}
        | row
        | {"seconds": round(time.monotonic() - t0, 1)}
    )


async def _measure(stack, trace, s: Settings, on_request) -> dict:
    marks: dict = {}

    async def at_warmup_end() -> None:
        await asyncio.sleep(s.warmup_s)
        marks["before"] = await snapshot(stack)
        marks["t"] = time.monotonic()

    mark = asyncio.create_task(at_warmup_end())
    outcomes = await run_trace(stack.url, trace, send, on_request)
    await mark
    seconds = time.monotonic() - marks["t"]
    after = await snapshot(stack)
    delta = {k: after.get(k, 0.0) - marks["before"].get(k, 0.0) for k in after}
    measured = [o for o in outcomes if o.at >= s.warmup_s]
    return summarize(measured, seconds, s.slo) | engines(delta, after, seconds)


def _ms(values: list[float], q: float) -> float | None:
    return round(1000 * percentile(values, q), 1) if values else None


def latency(outcomes: list[Outcome]) -> dict:
    done = [o for o in outcomes if o.ok]
    ttft = [o.ttft for o in done if o.ttft is not None]
    tpot = [o.tpot for o in done if o.tpot is not None]
    gaps = [g for o in done for g in o.gaps]
    out = {"requests": len(outcomes), "errors": len(outcomes) - len(done)}
    for q in (50, 90, 99):
        out[f"ttft_p{q}_ms"] = _ms(ttft, q)
    for q in (50, 90, 99):
        out[f"tpot_p{q}_ms"] = _ms(tpot, q)
    out["itl_p99_ms"] = _ms(gaps, 99)
    # each request's longest wait between two tokens: a prefill sharing its engine's step
    worst = [max(o.gaps) for o in done if o.gaps]
    out["worst_gap_p50_ms"] = _ms(worst, 50)
    out["worst_gap_p90_ms"] = _ms(worst, 90)
    return out


def summarize(measured: list[Outcome], seconds: float, slo: Slo | None = None) -> dict:
    done = [o for o in measured if o.ok]
    prompt = sum(o.prompt_tokens for o in done)
    slo = slo or Slo()
    met = sum(slo.met_by(o) for o in measured)  # type: ignore[arg-type]  # same fields
    row = latency(measured) | {
        "goodput_per_s": round(met / seconds, 2),
        "output_tokens_per_s": round(sum(len(o.token_times) for o in done) / seconds, 1),
        "requests_per_s": round(len(done) / seconds, 2),
        "mean_prompt_tokens": round(prompt / len(done)) if done else None,
        "cached_share": round(sum(o.cached_tokens for o in done) / prompt, 3) if prompt else None,
        "by_kind": {k: latency([o for o in measured if o.kind == k]) for k in (LONG, DECODE)},
        "error_samples": sorted({o.error or f"HTTP {o.status}" for o in measured if not o.ok})[:5],
    }
    return row


def engines(delta: dict[str, float], after: dict[str, float], seconds: float) -> dict:
    """Per pod role: utilization (the step time the latency model asked for, over the
    measured wall time) and lag (wall time the steps took over what the model asked for,
    minus 1: how far the processes, sharing two cores, fell behind the model); and the P/D
    counters: the picker's decisions, the sidecars' prefill legs, fallbacks and errors."""
    util, lag = {}, {}
    for role in sorted(k.removesuffix("_pods") for k in after if k.endswith("_pods")):
        modeled, n = delta.get(f"{role}_modeled", 0.0), after[f"{role}_pods"]
        if modeled > 0 and n:
            util[role] = round(modeled / (seconds * n), 3)
            lag[role] = round(delta[f"{role}_busy"] / modeled - 1, 3)
    out: dict = {"engine_utilization": util, "engine_lag": lag}
    pd = {k: int(v) for k, v in delta.items() if k.startswith("pd_") or k in _PD_KEYS}
    if any(pd.values()):
        out["pd"] = pd
    return out


_PD_KEYS = ("fallbacks", "connector_errors", "prefill_legs")
