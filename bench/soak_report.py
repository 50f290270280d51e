"""The soak benchmark's bookkeeping: what each request came to, which fault it ran into, which
errors no fault explains, and the table and plot of a run.

A request's outcome is its HTTP status ("200", "503", …) when a complete answer came back, or
"connection error", "timeout" or "lost answer" (a 200 whose body was cut short or unreadable).
An error (anything but a 200) is attributed to the first fault it was in flight at — started
before the fault struck and ended after — else to the first fault whose window (from striking
to recovered) it started in, else to steady state. A fault that kills a component
(`kills=True`) may cost the requests in flight at that instant; every other 500, connection
error, timeout or lost answer is a violation.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

OK = "200"
LOST = ("500", "connection error", "timeout", "lost answer")  # never acceptable outside a kill
STEADY = "steady state"


@dataclass(slots=True)
class Outcome:
    start: float  # seconds since the load began
    end: float
    kind: str


@dataclass(slots=True)
class FaultWindow:
    name: str
    kills: bool  # a component is killed: the requests in flight with it may fail
    start: float  # seconds since the load began
    end: float | None = None  # recovered; None: never recovered within the run
    # When the killed process was gone (it takes a few ms after the signal; for the picker,
    # until Envoy closed its connections to it): a request that started before then may
    # have been handed to it, and is in flight with it too.
    gone: float | None = None

    def in_flight(self, o: Outcome) -> bool:
        last = self.start if self.gone is None else max(self.start, self.gone)
        return self.kills and o.start < last and self.start < o.end

    def during(self, o: Outcome, run_end: float) -> bool:
        end = run_end if self.end is None else self.end
        return self.start <= o.start <= end


@dataclass(slots=True)
class Attribution:
    """Per fault: requests in flight at it or started during it (steady state: started
    outside every fault), and errors by kind."""

    in_flight: int = 0
    during: int = 0
    errors: Counter = field(default_factory=Counter)
    violations: Counter = field(default_factory=Counter)


def attribute(
    outcomes: list[Outcome], faults: list[FaultWindow], run_end: float
) -> dict[str, Attribution]:
    table = {f.name: Attribution() for f in faults} | {STEADY: Attribution()}
    for o in outcomes:
        hit = next((f for f in faults if f.in_flight(o)), None)
        struck = hit is not None
        if hit is None:
            hit = next((f for f in faults if f.during(o, run_end)), None)
        row = table[hit.name if hit else STEADY]
        if struck:
            row.in_flight += 1
        else:
            row.during += 1
        if o.kind == OK:
            continue
        row.errors[o.kind] += 1
        if o.kind in LOST and not (struck and hit.kills):
            row.violations[o.kind] += 1
    return table


def summarize(outcomes: list[Outcome], faults: list[FaultWindow], run_end: float) -> dict:
    """The run's totals and attribution, as JSON."""
    kinds = Counter(o.kind for o in outcomes)
    table = attribute(outcomes, faults, run_end)
    return {
        "sent": len(outcomes),
        "answered": kinds[OK],
        "by_kind": dict(sorted(kinds.items())),
        "faults": [
            {
                "name": f.name,
                "kills": f.kills,
                "at_s": round(f.start, 2),
                "recovered_after_s": None if f.end is None else round(f.end - f.start, 2),
            }
            for f in faults
        ],
        "attribution": {
            name: {
                "in_flight": row.in_flight,
                "during": row.during,
                "errors": dict(row.errors),
                "violations": dict(row.violations),
            }
            for name, row in table.items()
        },
        "violations": sum(sum(row.violations.values()) for row in table.values()),
    }


def markdown(out: dict) -> str:
    m, s, r = out["machine"], out["settings"], out["result"]
    lines = [
        f"Measured {m['date']} on {m['cpu']} ({m['cores']} cores): {s['duration_s']:.0f} s of "
        f"{s['concurrency']} closed-loop clients through Envoy, the picker (FailOpen) and "
        f"{s['pods']} simulator pods, Redis-backed rate limit; picker peak RSS "
        f"{out['picker_peak_rss_mib']:.0f} MiB.",
        "",
        "| window | at (s) | recovered after (s) | in flight / started during | errors by kind "
        "| violations |",
        "|---|---|---|---|---|---|",
    ]
    faults = {f["name"]: f for f in r["faults"]}
    for name, row in r["attribution"].items():
        f = faults.get(name)
        at = f"{f['at_s']:.1f}" if f else "–"
        after = "–" if f is None else _seconds(f["recovered_after_s"])
        errors = ", ".join(f"{k}: {v}" for k, v in sorted(row["errors"].items())) or "none"
        violations = sum(row["violations"].values())
        lines.append(
            f"| {name} | {at} | {after} | {row['in_flight']} / {row['during']} | {errors} "
            f"| {violations} |"
        )
    errors = r["sent"] - r["answered"]
    lines.append(
        f"| **all** | | | {r['sent']} sent, {r['answered']} answered 200 | {errors} errors "
        f"| {r['violations']} |"
    )
    return "\n".join(lines)


def _seconds(value: float | None) -> str:
    return "never" if value is None else f"{value:.1f}"


def plot(out: dict, path: Path) -> Path:
    """Answers and errors per second over the run, each fault's window shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4))
    seconds = out["series"]["second"]
    ax.plot(seconds, out["series"]["answered"], color="tab:blue", label="answered 200 / s")
    ax.plot(seconds, out["series"]["errors"], color="tab:red", label="errors / s")
    top = max(out["series"]["answered"] + [1])
    for i, f in enumerate(out["result"]["faults"]):
        end = f["at_s"] + (f["recovered_after_s"] or 0.5)
        ax.axvspan(f["at_s"], max(end, f["at_s"] + 0.3), color=f"C{i + 2}", alpha=0.2)
        ax.text(f["at_s"], top * (0.95 - 0.08 * i), f["name"], fontsize=8)
    ax.set(xlabel="seconds since the load began", ylabel="requests per second")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    m = out["machine"]
    ax.set_title(f"soak and faults — {m['date']}, {m['cores']} cores", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
