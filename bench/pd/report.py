"""The P/D benchmark's markdown table and plot."""

from __future__ import annotations

from pathlib import Path

from infergw.bench.pd.workload import DECODE, LONG

COLUMNS = [
    ("mode", "mode"),
    ("rate", "rate req/s"),
    ("ttft_p50_ms", "TTFT p50 ms"),
    ("ttft_p90_ms", "TTFT p90 ms"),
    ("ttft_p99_ms", "TTFT p99 ms"),
    ("ttft_kinds", "TTFT p50 long / decode-heavy ms"),
    ("tpot_p50_ms", "TPOT p50 ms"),
    ("tpot_p90_ms", "TPOT p90 ms"),
    ("tpot_p99_ms", "TPOT p99 ms"),
    ("itl_p99_ms", "ITL p99 ms"),
    ("worst_gap_p50_ms", "longest gap p50 ms"),
    ("output_tokens_per_s", "out tok/s"),
    ("goodput_per_s", "goodput req/s"),
    ("engine_utilization", "engines busy"),
    ("errors", "errors"),
]
DECODE_COLUMNS = ("tpot_p50_ms", "tpot_p90_ms", "tpot_p99_ms", "itl_p99_ms", "worst_gap_p50_ms")
COLORS = {
    "aggregated": "tab:blue",
    "disaggregated": "tab:orange",
    "disaggregated-1-group": "tab:green",
}


def _cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_cell(v)}" for k, v in value.items()) or "–"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _pct(value: dict) -> str:
    return ", ".join(f"{k} {round(100 * v)}%" for k, v in value.items()) or "–"


def _max_lag(out: dict) -> str:
    lags = [v for r in out["rows"] for v in (r.get("engine_lag") or {}).values()]
    return f"{round(100 * max(lags))}%" if lags else "–"


def _tokens(words: int) -> str:
    return f"{round(1.5 * words, -1):,.0f}"  # the simulator's tokenizer: ~1.5 tokens a word


def _tuning(settings: dict) -> str:
    t = settings.get("tuning") or {}
    profile, params = t.get("latency_profile", "sim-default"), t.get("pd_params") or {}
    out = f" Latency profile {profile}." if profile != "sim-default" else ""
    if params:
        out += " pd-profile-handler: " + ", ".join(f"{k} {v}" for k, v in params.items()) + "."
    if "slo" in settings:
        slo = settings["slo"]
        out += f" Goodput: requests a second with TTFT ≤ {slo['ttft_ms']:g} ms and TPOT ≤ "
        out += f"{slo['tpot_ms']:g} ms."
    return out


def markdown(out: dict) -> str:
    m, s, w = out["machine"], out["settings"], out["settings"]["workload"]
    lines = [
        f"Measured {m['date']} on {m['cpu']} ({m['cores']} cores, {m['memory_gib']} GiB): "
        f"{s['pods']} simulator pods per mode, a fresh fleet per point, {s['warmup_s']:g} s "
        f"warm-up then {s['duration_s']:g} s of Poisson arrivals, seed {s['seed']}. Workload: "
        f"{round(100 * w['long_share'])}% long-prompt ({w['long_prompt_words']} words "
        f"≈ {_tokens(w['long_prompt_words'])} tokens, {w['long_output_tokens']} output tokens), "
        f"the rest decode-heavy ({w['decode_prompt_words']} words "
        f"≈ {_tokens(w['decode_prompt_words'])} tokens, {w['decode_output_tokens']} output "
        f"tokens); no prefix reuse; streamed completions through Envoy.{_tuning(s)} "
        "TPOT (per request), ITL "
        "(every gap between two tokens) and the longest gap of each request are over the "
        "decode-heavy requests; engines busy is the share of time each role's engines ran "
        f"steps by the latency model (largest lag behind it: {_max_lag(out)}).",
        "",
        "| " + " | ".join(h for _, h in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for r in out["rows"]:
        kinds = r["by_kind"]
        dec = kinds[DECODE]
        cells = {k: _cell(r.get(k)) for k, _ in COLUMNS}
        cells["ttft_kinds"] = f"{_cell(kinds[LONG]['ttft_p50_ms'])} / {_cell(dec['ttft_p50_ms'])}"
        for k in DECODE_COLUMNS:
            cells[k] = _cell(dec[k])
        cells["engine_utilization"] = _pct(r.get("engine_utilization") or {})
        lines.append("| " + " | ".join(cells.values()) + " |")
    return "\n".join(lines)


def plot(out: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ttft_ax, tpot_ax, gap_ax) = plt.subplots(1, 3, figsize=(15, 4.4))
    for mode, color in COLORS.items():
        rows = sorted((r for r in out["rows"] if r["mode"] == mode), key=lambda r: r["rate"])
        if not rows:
            continue
        rates = [r["rate"] for r in rows]
        decode = [r["by_kind"][DECODE] for r in rows]
        for q, style in (("p50", "-"), ("p90", "--")):
            label = dict(color=color, label=f"{mode} {q}", marker="o")
            ttft_ax.plot(rates, [r[f"ttft_{q}_ms"] for r in rows], style, **label)
            tpot_ax.plot(rates, [d[f"tpot_{q}_ms"] for d in decode], style, **label)
            gap_ax.plot(rates, [d[f"worst_gap_{q}_ms"] for d in decode], style, **label)
    ttft_ax.set(title="time to first token (all requests)", xlabel="requests/s", ylabel="ms")
    tpot_ax.set(title="time per output token (decode-heavy)", xlabel="requests/s", ylabel="ms")
    gap_ax.set(
        title="longest gap between two tokens (decode-heavy)",
        xlabel="requests/s",
        ylabel="ms",
    )
    for ax in (ttft_ax, tpot_ax, gap_ax):
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    m = out["machine"]
    fig.suptitle(
        f"bench/pd: 4 simulator pods, aggregated vs 2 prefill + 2 decode ({m['date']}, "
        f"{m['cores']} cores)",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
