"""The fairness benchmark's table (markdown) and plot (latency per tenant over time, without
and with flow control)."""

from __future__ import annotations

from pathlib import Path

MODES = (("off", "without flow control"), ("on", "with flow control (fairness)"))
COLORS = {"tenant-a": "tab:red", "tenant-b": "tab:blue", "tenant-c": "tab:green"}


def markdown(out: dict) -> str:
    m, s = out["machine"], out["settings"]
    lines = [
        "Latency: requests sent after the warm-up. Tokens: answers that arrived between the "
        "warm-up and the end of sending (as the clients' usage reported them; weighted = "
        "prompt + 2 × output, VTC's weights).",
        "",
        f"Measured {m['date']} on {m['cpu']} ({m['cores']} cores, {m['memory_gib']} GiB): "
        f"examples/fairness (1 simulator pod, {s['slots']} slots), B alone for "
        f"{s['alone_s']:g} s, then all three tenants for {s['duration_s']:g} s (the first "
        f"{s['warmup_s']:g} s not counted).",
        "",
        "| flow control | tenant | load | requests | p50 s | p90 s | p99 s | answers served "
        "| prompt tokens | output tokens | weighted tokens | share |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, _ in MODES:
        result = out["modes"].get(mode)
        if result is None:
            continue
        tenants = result["tenants"]
        total = sum(t["weighted_tokens"] for t in tenants.values()) or 1
        for name, t in tenants.items():
            lines.append(
                f"| {mode} | {name} | {s['tenants'][name]} | {t['requests']} | {t['p50_s']} "
                f"| {t['p90_s']} | {t['p99_s']} | {t['served_requests']} | {t['prompt_tokens']} "
                f"| {t['completion_tokens']} | {t['weighted_tokens']:.0f} "
                f"| {t['weighted_tokens'] / total:.0%} |"
            )
    lines += [
        "",
        "| flow control | B alone p50 / p90 s | B p90 under load / alone | max gap A−C "
        "(weighted tokens) | VTC bound | `batch` request while queued |",
        "|---|---|---|---|---|---|",
    ]
    for mode, _ in MODES:
        r = out["modes"].get(mode)
        if r is None:
            continue
        lines.append(
            f"| {mode} | {r['b_alone']['p50_s']} / {r['b_alone']['p90_s']} "
            f"| {r['b_p90_ratio']}x | {r['service_gap_a_c']:.0f} | {r['vtc_bound']:.0f} "
            f"| {r['sheddable_status']} |"
        )
    return "\n".join(lines)


def plot(out: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    s = out["settings"]
    for ax, (mode, title) in zip(axes, MODES, strict=True):
        result = out["modes"].get(mode)
        ax.set_title(title)
        ax.set_xlabel("request sent at (s since the flood began)")
        ax.grid(alpha=0.3)
        if result is None:
            continue
        for name, points in result["series"].items():
            if not points:
                continue
            xs, ys = zip(*points, strict=True)
            label = f"{name} ({s['tenants'][name]})"
            ax.scatter(xs, ys, s=9, alpha=0.6, color=COLORS.get(name), label=label)
        alone = result["b_alone"]["p90_s"]
        ax.axhline(alone, color=COLORS["tenant-b"], ls="--", lw=1, label=f"B alone p90 {alone} s")
        ax.axhline(1.5 * alone, color=COLORS["tenant-b"], ls=":", lw=1, label="1.5 × that")
        ax.axvspan(0, s["warmup_s"], color="grey", alpha=0.12)
    axes[0].set_ylabel("latency (s)")
    handles, labels = axes[-1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    m = out["machine"]
    fig.suptitle(
        f"examples/fairness: one pod, three tenants — {m['date']}, {m['cores']} cores "
        "(grey: warm-up, not counted)",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
