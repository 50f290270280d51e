"""Helpers shared by benchmarks: machine description, process CPU time, percentiles, output."""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PLOTS = ROOT / "docs" / "benchmarks"


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_gib, 1),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }


def _stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat after the command name (which may hold spaces and parentheses)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def process_gone(pid: int) -> bool:
    """Whether the process no longer runs: reaped, or a zombie awaiting its parent."""
    try:
        return _stat_fields(pid)[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def counter_sum(text: str, name: str) -> float:
    """The samples of a counter in a Prometheus page, with or without its _total suffix,
    summed over its labels."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line.split("{")[0].split(" ")[0] in (name, name + "_total"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (and its reaped children), from /proc."""
    fields = _stat_fields(pid)
    ticks = sum(int(x) for x in fields[11:15])  # utime, stime, cutime, cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def cpu_over(pids: dict[str, int], seconds: float) -> dict[str, float]:
    """CPU seconds each process spends over the next `seconds` (this thread sleeps)."""
    before = {n: process_cpu_seconds(p) for n, p in pids.items()}
    time.sleep(seconds)
    return {n: process_cpu_seconds(p) - before[n] for n, p in pids.items()}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def write_json(name: str, data: dict, directory: Path = RESULTS) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


# A list of numbers written by json.dumps(indent=...): one number a line.
_NUMBER_LIST = re.compile(r"\[\s*(-?[\d.eE+-]+(?:,\s*-?[\d.eE+-]+)*)\s*\]")


def compact_json(data) -> str:
    """Indented JSON with each list of numbers on one line."""

    def one_line(m: re.Match) -> str:
        return "[" + ", ".join(m.group(1).replace(",", " ").split()) + "]"

    return _NUMBER_LIST.sub(one_line, json.dumps(data, indent=1))


def save_results(
    name: str,
    out: dict,
    *,
    quick: bool,
    output_dir: Path | None,
    plot: Callable[[dict, Path], Path],
    markdown: Callable[[dict], str],
) -> None:
    """Write a benchmark's JSON (bench/results/<name>-<date>[-quick].json) and plot
    (docs/benchmarks/<name>[-quick].png), or both into output_dir, and print the table.
    Lists of numbers (a plot's points) stay on one line each."""
    suffix = "-quick" if quick else ""
    results_dir, plots_dir = output_dir or RESULTS, output_dir or PLOTS
    results_dir.mkdir(parents=True, exist_ok=True)
    plots_dir.mkdir(parents=True, exist_ok=True)
    json_path = results_dir / f"{name}-{out['machine']['date']}{suffix}.json"
    json_path.write_text(compact_json(out) + "\n")
    print("wrote", json_path)
    print("wrote", plot(out, plots_dir / f"{name}{suffix}.png"))
    print(markdown(out))


def positive_number(text: str) -> float:
    """An argparse type: a positive finite number (a rate, seconds); a clear usage error else."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value < float("inf"):  # NaN fails too
        raise argparse.ArgumentTypeError(f"a positive finite number, got {text!r}")
    return value


def rate_list(text: str) -> list[float]:
    """An argparse type: comma-separated request rates, each a positive_number."""
    return [positive_number(r) for r in text.split(",")]
