"""The routing benchmark's plots: TTFT p90 against load, prefix-cache hits and goodput per
router (both at each workload's highest rate)."""

from __future__ import annotations

from pathlib import Path

from infergw.bench.routing.report import slo_label


def plot(out: dict, directory: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = [w["name"] for w in out["workloads"]]
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, draw in (("ttft", _ttft), ("hits", _hits), ("goodput", _goodput)):
        fig, axes = plt.subplots(1, len(workloads), figsize=(5 * len(workloads), 4), squeeze=False)
        for ax, wl in zip(axes[0], workloads, strict=True):
            draw(ax, out, wl)
        fig.tight_layout()
        path = directory / f"routing-{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def _rows(out: dict, wl: str) -> list[dict]:
    return [r for r in out["rows"] if r["workload"] == wl and "unavailable" not in r]


def _ttft(ax, out: dict, wl: str) -> None:
    rows = _rows(out, wl)
    for router in dict.fromkeys(r["router"] for r in rows):
        mine = [r for r in rows if r["router"] == router]
        ax.plot([r["rate"] for r in mine], [r["ttft_p90_ms"] for r in mine], "o-", label=router)
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
    ax.legend(fontsize=7)


def _at_top_rate(ax, out: dict, wl: str, bars: list[tuple[str, str]]) -> float | None:
    """Two bars a router (field, label) at the workload's highest rate; that rate."""
    rows = _rows(out, wl)
    if not rows:
        return None
    top = max(r["rate"] for r in rows)
    at_top = [r for r in rows if r["rate"] == top]
    ys = range(len(at_top))
    for offset, (key, label) in zip((0.2, -0.2), bars, strict=True):
        ax.barh([y + offset for y in ys], [r.get(key) or 0 for r in at_top], 0.4, label=label)
    ax.set_yticks(list(ys), [r["router"] for r in at_top], fontsize=7)
    ax.set_title(f"{wl} at {top} req/s")
    return top


def _hits(ax, out: dict, wl: str) -> None:
    bars = [
        ("cached_share", "cached on admission (per request)"),
        ("prefix_hit_rate", "pods' hit counters"),
    ]
    top = _at_top_rate(ax, out, wl, bars)
    for o in out["oracle"]:
        if o["workload"] == wl and o["rate"] == top:
            ax.axvline(o["hit_rate"], color="k", linestyle="--", label="oracle")
    ax.legend(fontsize=7)
    ax.set_xlabel("share of prompt tokens served from cache")
    ax.set_xlim(0, 1)


def _goodput(ax, out: dict, wl: str) -> None:
    slo = out["settings"].get("slo")
    bars = [
        ("goodput_per_s", f"goodput: {slo_label(slo)}" if slo else "goodput"),
        ("requests_per_s", "completed"),
    ]
    top = _at_top_rate(ax, out, wl, bars)
    if top is not None:
        ax.axvline(top, color="k", linestyle="--", label="asked rate (a trace's own varies)")
    # Below the axes: the bars reach the right edge wherever goodput is high.
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18))
    ax.set_xlabel("requests per second")
