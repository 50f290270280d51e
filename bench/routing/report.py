"""The routing benchmark's markdown table and plots."""

from __future__ import annotations

from pathlib import Path

COLUMNS = [
    ("router", "router"),
    ("rate", "rate req/s"),
    ("ttft_p50_ms", "TTFT p50 ms"),
    ("ttft_p90_ms", "TTFT p90 ms"),
    ("ttft_p99_ms", "TTFT p99 ms"),
    ("tpot_p50_ms", "TPOT p50 ms"),
    ("output_tokens_per_s", "out tok/s"),
    ("requests_per_s", "req/s done"),
    ("prefix_hit_rate", "pods' hit rate"),
    ("cached_share", "cached on admission"),
    ("load_imbalance", "imbalance"),
    ("router_cpu_ms_per_request", "router CPU ms/req"),
    ("router_idle_cpu_pct", "idle CPU % core"),
    ("router_cpu_ms_per_request_above_idle", "CPU ms/req above idle"),
    ("errors", "errors"),
]
# Columns whose cell also names each process's share, from these per-process fields.
BY_PROCESS = {
    "router_cpu_ms_per_request": "router_cpu_ms_per_request_by_process",
    "router_idle_cpu_pct": "router_idle_cpu_pct",
    "router_cpu_ms_per_request_above_idle": "router_cpu_ms_per_request_above_idle_by_process",
}


def markdown(out: dict) -> str:
    m, s = out["machine"], out["settings"]
    lines = [
        f"Measured {m['date']} on {m['cpu']} ({m['cores']} cores, {m['memory_gib']} GiB): "
        f"{s['pods']} simulator pods, {s['warmup_s']:.0f} s warm-up then {s['duration_s']:.0f} s "
        f"of Poisson arrivals per point, a fresh fleet for every point, seed {s['seed']}."
        + (
            f" Each router first idles {s['idle_s']:.0f} s (the picker scraping every pod at "
            "50 ms): its CPU then, over the measured window, is not charged to requests."
            if s.get("idle_s")
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
            lines.append(
                f"| *oracle bound* | {o['rate']} | {o['ttft_p50_ms']} | {o['ttft_p90_ms']} | "
                f"{o['ttft_p99_ms']} | | | | | {o['hit_rate']} | | | | | | |"
            )
    return "\n".join(lines)


def _describe(wl: dict) -> str:
    return ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in wl.items() if k != "name")


def _cell(v) -> str:
    return "–" if v is None else str(v)


def plot(out: dict, directory: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    routers = list(dict.fromkeys(r["router"] for r in out["rows"] if "unavailable" not in r))
    workloads = [w["name"] for w in out["workloads"]]
    directory.mkdir(parents=True, exist_ok=True)

    fig, axes = plt.subplots(1, len(workloads), figsize=(5 * len(workloads), 4), squeeze=False)
    for ax, wl in zip(axes[0], workloads, strict=True):
        for router in routers:
            rows = [r for r in out["rows"] if r["workload"] == wl and r["router"] == router]
            rows = [r for r in rows if "unavailable" not in r]
            if rows:
                ax.plot(
                    [r["rate"] for r in rows], [r["ttft_p90_ms"] for r in rows], "o-", label=router
                )
        oracle = [o for o in out["oracle"] if o["workload"] == wl]
        if oracle:
            ax.plot(
                [o["rate"] for o in oracle],
                [o["ttft_p90_ms"] for o in oracle],
                "k--",
                label="oracle (no queueing)",
            )
        ax.set_title(wl)
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel("TTFT p90 (ms)")
        ax.set_yscale("log")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    ttft = directory / "routing-ttft.png"
    fig.savefig(ttft, dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(workloads), figsize=(5 * len(workloads), 4), squeeze=False)
    for ax, wl in zip(axes[0], workloads, strict=True):
        rows = [r for r in out["rows"] if r["workload"] == wl and "unavailable" not in r]
        if not rows:
            continue
        top = max(r["rate"] for r in rows)
        at_top = [r for r in rows if r["rate"] == top]
        ys = range(len(at_top))
        ax.barh(
            [y + 0.2 for y in ys],
            [r["cached_share"] or 0 for r in at_top],
            0.4,
            label="cached on admission (per request)",
        )
        ax.barh(
            [y - 0.2 for y in ys],
            [r["prefix_hit_rate"] or 0 for r in at_top],
            0.4,
            label="pods' hit counters",
        )
        ax.set_yticks(list(ys), [r["router"] for r in at_top], fontsize=7)
        for o in out["oracle"]:
            if o["workload"] == wl and o["rate"] == top:
                ax.axvline(o["hit_rate"], color="k", linestyle="--", label="oracle")
        ax.legend(fontsize=7)
        ax.set_title(f"{wl} at {top} req/s")
        ax.set_xlabel("share of prompt tokens served from cache")
        ax.set_xlim(0, 1)
    fig.tight_layout()
    hits = directory / "routing-hits.png"
    fig.savefig(hits, dpi=100)
    plt.close(fig)
    return [ttft, hits]
