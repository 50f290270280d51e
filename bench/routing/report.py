"""The routing benchmark's markdown table (plots.py draws its plots)."""

from __future__ import annotations

COLUMNS = [
    ("router", "router"),
    ("rate", "rate req/s"),
    ("ttft_mean_ms", "TTFT mean ms"),
    ("ttft_p50_ms", "TTFT p50 ms"),
    ("ttft_p90_ms", "TTFT p90 ms"),
    ("ttft_p99_ms", "TTFT p99 ms"),
    ("tpot_p50_ms", "TPOT p50 ms"),
    ("output_tokens_per_s", "out tok/s"),
    ("requests_per_s", "req/s done"),
    ("goodput_per_s", "goodput req/s"),
    ("slo_met_share", "SLO met"),
    ("prefix_hit_rate", "pods' hit rate"),
    ("cached_share", "cached on admission"),
    ("load_imbalance", "imbalance"),
    ("pods_cpu_ms_per_request", "pods' CPU ms/req"),
    ("router_cpu_ms_per_request", "router CPU ms/req"),
    ("router_idle_cpu_pct", "idle CPU % core"),
    ("router_cpu_ms_per_request_above_idle", "CPU ms/req above idle"),
    ("scrape_pages_per_s", "pages scraped /s"),
    ("router_cpu_ms_per_request_scraping", "scraping CPU ms/req"),
    ("router_cpu_ms_per_request_without_scraping", "CPU ms/req without scraping"),
    ("errors", "errors"),
]
# Columns whose cell also names each process's share, from these per-process fields.
BY_PROCESS = {
    "router_cpu_ms_per_request": "router_cpu_ms_per_request_by_process",
    "router_idle_cpu_pct": "router_idle_cpu_pct",
    "router_cpu_ms_per_request_above_idle": "router_cpu_ms_per_request_above_idle_by_process",
}
# The oracle's row fills these columns (its hit rate under "cached on admission": both count
# the prompt tokens found cached per request); the rest stay empty.
ORACLE_COLUMNS = {
    "ttft_mean_ms": "ttft_mean_ms",
    "ttft_p50_ms": "ttft_p50_ms",
    "ttft_p90_ms": "ttft_p90_ms",
    "ttft_p99_ms": "ttft_p99_ms",
    "cached_share": "hit_rate",
}


def markdown(out: dict) -> str:
    m, s = out["machine"], out["settings"]
    lines = [
        f"Measured {m['date']} on {m['cpu']} ({m['cores']} cores, {m['memory_gib']} GiB): "
        f"{s['pods']} simulator pods, {s['warmup_s']:.0f} s warm-up then {s['duration_s']:.0f} s "
        "of arrivals (Poisson unless the workload says otherwise) per point, a fresh fleet for "
        f"every point, seed {s['seed']}."
        + (f" Goodput: requests per second with {slo_label(s['slo'])}." if "slo" in s else "")
        + (
            f" Each router first idles {s['idle_s']:.0f} s (the picker scraping every pod at "
            "50 ms): its CPU then, over the measured window, is not charged to requests."
            if s.get("idle_s")
            else ""
        )
        + (
            f" The pods ran on CPUs {_cpus(s['cpus']['pods'])}, the router and the load "
            f"generator on {_cpus(s['cpus']['router_and_client'])}."
            if s.get("cpus")
            else ""
        ),
    ]
    for wl in out["workloads"]:
        name = wl["name"]
        rows = [r for r in out["rows"] if r["workload"] == name]
        if not rows:
            continue
        lines += ["", f"**{name}** — {_describe(wl)}", ""]
        lines.append("| " + " | ".join(h for _, h in COLUMNS) + " |")
        lines.append("|" + "---|" * len(COLUMNS))
        for r in rows:
            if "unavailable" in r:
                lines.append(f"| {r['router']} | {r['rate']} | not run: {r['unavailable']} |")
                continue
            cells = {k: _cell(r.get(k)) for k, _ in COLUMNS}
            for column, field in BY_PROCESS.items():
                split = r.get(field) or {}
                if column == field and split:  # a per-process dict only: its sum, then parts
                    cells[column] = _cell(round(sum(split.values()), 2))
                if len(split) > 1:
                    parts = " + ".join(f"{n} {v}" for n, v in split.items())
                    cells[column] += f" ({parts})"
            lines.append("| " + " | ".join(cells.values()) + " |")
        for o in (o for o in out["oracle"] if o["workload"] == name):
            cells = {k: "" for k, _ in COLUMNS} | {"router": "*oracle bound*", "rate": o["rate"]}
            cells |= {k: _cell(o.get(field)) for k, field in ORACLE_COLUMNS.items()}
            lines.append("| " + " | ".join(str(c) for c in cells.values()) + " |")
    return "\n".join(lines)


def slo_label(slo: dict) -> str:
    return f"TTFT ≤ {slo['ttft_ms']:g} ms and TPOT ≤ {slo['tpot_ms']:g} ms"


def _describe(wl: dict) -> str:
    """A workload's parameters in a line; a mix's parts by name, theirs in brackets."""
    return ", ".join(
        f"{k.replace('_', ' ')} "
        + (f"{v['name']} ({_describe(v)})" if isinstance(v, dict) else str(v))
        for k, v in wl.items()
        if k != "name"
    )


def _cpus(cpus: list[int]) -> str:
    return ",".join(map(str, cpus))


def _cell(v) -> str:
    return "–" if v is None else str(v)
