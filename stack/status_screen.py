"""`infergate status`: one terminal screen of a local stack or a cluster namespace — the pods
behind each picker with their load (running, waiting, in flight) and KV-cache use, the
cached-token share, the flow-control queue, errors by code; in a cluster the Models, their
pods, the autoscaler's last decisions and the recent Warning Events.

    infergate status                      # the local stack's pickers (infergate up), refreshing
    infergate status --once               # one plain-text snapshot, for scripts and tests
    infergate status --kubernetes -n team # a namespace of a cluster (kubeconfig), its pickers
                                          # read through the API server's pod proxy

The refreshing screen needs `rich` (the `status` extra); `--once` prints plain text without it.
What it reads is untrusted (status_sources.py): unknown values are shown as `?`.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import math
import sys
import time
import urllib.parse
from dataclasses import dataclass, field

from infergw.api.cli_help import HelpFormatter
from infergw.cluster.kube_store import KubeStore
from infergw.stack.ports import StackPorts
from infergw.stack.status_cluster import read_cluster, read_pool_pickers
from infergw.stack.status_sources import (
    ERRORS,
    QUEUE,
    READY_PODS,
    REQUESTS,
    WAITING_FOR_CAPACITY,
    ClusterView,
    PickerView,
    read_picker,
)

RICH_MISSING = 3  # the exit status when the screen's extra is not installed
# infergate up's pickers (Models x --pickers) listen at picker 0's ports + i * the stride:
# the first is always shown, the next ones when they answer.
LOCAL_PICKERS = tuple(f"http://127.0.0.1:{StackPorts().picker_ports(i).metrics}" for i in range(8))
UNKNOWN = "?"
NO_PODS = "no pods behind it"  # a picker that answers with none (a pool at zero)


@dataclass(slots=True)
class Snapshot:
    taken: float
    pickers: list[PickerView] = field(default_factory=list)
    cluster: ClusterView | None = None
    # errors counted since the previous snapshot, per picker URL (None: the first)
    new_errors: dict[str, float | None] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        cluster_ok = self.cluster is None or self.cluster.error is None
        return cluster_ok and all(p.error is None for p in self.pickers)


def fmt(value: float | None, pattern: str = "{:g}") -> str:
    return UNKNOWN if value is None else pattern.format(value)


def pct(value: float | None) -> str:
    return UNKNOWN if value is None else f"{value * 100:.0f}%"


class Reader:
    """Takes snapshots; remembers error counts to show those since the last one."""

    def __init__(
        self,
        pickers: list[str],
        store: KubeStore | None = None,
        namespace: str = "default",
        pool_pickers: bool = False,
        optional: tuple[str, ...] = (),
    ) -> None:
        """`pool_pickers`: also read the namespace's pickers through the API server;
        `optional`: pickers shown only while their address answers."""
        self.pickers, self.store, self.namespace = [*pickers, *optional], store, namespace
        self.required = len(pickers)
        self.pool_pickers = pool_pickers and store is not None
        self._errors: dict[str, float] = {}

    async def snapshot(self) -> Snapshot:
        read = await asyncio.gather(*(asyncio.to_thread(read_picker, u) for u in self.pickers))
        views = [v for i, v in enumerate(read) if v.answered or i < self.required]
        if self.store is not None and self.pool_pickers:
            views += await read_pool_pickers(self.store, self.namespace)
        snap = Snapshot(time.time(), views)
        for v in views:
            total = v.samples.get(ERRORS) if v.samples is not None else None
            before = self._errors.get(v.url)
            snap.new_errors[v.url] = (
                None if total is None or before is None else max(0.0, total - before)
            )
            if total is not None:
                self._errors[v.url] = total
        if self.store is not None:
            snap.cluster = await read_cluster(self.store, self.namespace)
        return snap


# ---- plain text (--once) ------------------------------------------------------------------


def picker_head(v: PickerView, new_errors: float | None) -> list[str]:
    """The lines above a picker's pods: what failed to read, requests, errors, the cache."""
    s = v.samples
    lines = []
    if v.error:
        lines.append(f"unreachable or unreadable: {v.error}")
    if s is not None:
        codes = ", ".join(f"{c}: {n:g}" for c, n in sorted(s.errors_by_code.items())) or "none"
        lines += [
            f"requests {fmt(s.get(REQUESTS))}  errors {fmt(s.get(ERRORS))} ({codes})"
            f"  new errors {fmt(new_errors)}",
            f"cached-token share {pct(v.cached_share)}  flow-control queue {fmt(s.get(QUEUE))}"
            f"  waiting for capacity {fmt(s.get(WAITING_FOR_CAPACITY))}"
            f"  ready pods {fmt(s.get(READY_PODS))}",
        ]
    return lines


def picker_lines(v: PickerView, new_errors: float | None) -> list[str]:
    lines = [f"picker {v.url}  pool {v.pool or UNKNOWN}"]
    lines += [f"  {line}" for line in picker_head(v, new_errors)]
    if not v.pods:
        return lines if v.error else [*lines, f"  {NO_PODS}"]
    lines.append(
        f"  {'pod':<28} {'address':<22} {'ok':<3} {'running':>7} {'waiting':>7} "
        f"{'inflight':>8} {'kv':>5}"
    )
    for p in v.pods:
        ok = UNKNOWN if p.reachable is None else "yes" if p.reachable else "no"
        lines.append(
            f"  {(p.name or UNKNOWN)[:28]:<28} {(p.address or UNKNOWN)[:22]:<22} {ok:<3} "
            f"{fmt(p.running):>7} {fmt(p.waiting):>7} {fmt(p.inflight):>8} {pct(p.kv_usage):>5}"
        )
    if v.more_pods:
        lines.append(f"  … and {v.more_pods} more pods")
    return lines


def cluster_lines(c: ClusterView) -> list[str]:
    lines = [f"namespace {c.namespace}"]
    if c.error:
        lines.append(f"  {c.error}")
    for m in c.models:
        lines.append(
            f"  model {m.name or UNKNOWN}: Ready {m.ready or UNKNOWN} "
            f"({m.reason or UNKNOWN}), {fmt(m.ready_replicas)}/{fmt(m.replicas)} "
            "groups ready"
        )
    for p in c.pods:
        lines.append(
            f"  pod {p.name or UNKNOWN} ({p.model or UNKNOWN}): {p.phase or UNKNOWN}, "
            f"{'ready' if p.ready else 'not ready'}, restarts {fmt(p.restarts)}"
        )
    for d in c.decisions:
        lines.append(
            f"  scaling {d.binding or UNKNOWN} {d.target or UNKNOWN}: "
            f"{fmt(d.current)} -> {fmt(d.desired)} ({d.reason or UNKNOWN}; "
            f"{d.metrics or 'no metrics'})"
        )
    for e in c.warnings:
        lines.append(
            f"  warning {e.when or UNKNOWN} {e.object or UNKNOWN} {e.reason or UNKNOWN}"
            f" x{fmt(e.count)}: {e.note or ''}"
        )
    return lines


def render_text(snap: Snapshot) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(snap.taken))
    lines = [f"infergate status  {stamp}"]
    for v in snap.pickers:
        lines += picker_lines(v, snap.new_errors.get(v.url))
    if snap.cluster is not None:
        lines += cluster_lines(snap.cluster)
    return "\n".join(lines)


# ---- the refreshing screen (rich) ---------------------------------------------------------


def render_rich(snap: Snapshot):
    from rich.console import Group
    from rich.markup import escape
    from rich.panel import Panel
    from rich.table import Table

    parts = []
    for v in snap.pickers:
        table = Table(expand=True)
        for col in ("pod", "address", "reachable", "running", "waiting", "in flight", "KV"):
            table.add_column(col)
        for p in v.pods:
            ok = UNKNOWN if p.reachable is None else "yes" if p.reachable else "[red]no[/]"
            kv = pct(p.kv_usage)
            if p.kv_usage is not None and p.kv_usage > 0.9:
                kv = f"[red]{kv}[/]"
            table.add_row(
                escape(p.name or UNKNOWN),
                escape(p.address or UNKNOWN),
                ok,
                fmt(p.running),
                fmt(p.waiting),
                fmt(p.inflight),
                kv,
            )
        head = [escape(line) for line in picker_head(v, snap.new_errors.get(v.url))]
        if v.error:
            head[0] = f"[red]{head[0]}[/]"
        title = f"picker {v.url} · pool {v.pool or UNKNOWN}"
        body = table if v.pods else None if v.error else NO_PODS
        parts.append(Panel(Group(*head, *([body] if body else [])), title=escape(title)))
    if snap.cluster is not None:
        lines = [escape(line.strip()) for line in cluster_lines(snap.cluster)[1:]]
        parts.append(
            Panel("\n".join(lines) or "nothing here", title=f"namespace {snap.cluster.namespace}")
        )
    stamp = time.strftime("%H:%M:%S", time.localtime(snap.taken))
    return Panel(Group(*parts), title=f"infergate status · {stamp}", subtitle="Ctrl-C to quit")


# ---- the command --------------------------------------------------------------------------


def picker_url(text: str) -> str:
    """An http(s) address with a host: the only thing --picker reads from."""
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"{text!r} is not an http:// or https:// address")
    return text


def interval(text: str) -> float:
    """Seconds between refreshes: a finite number from 0.2 to an hour."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.2 <= value <= 3600:  # NaN fails too
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds from 0.2 to 3600")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="infergate status",
        description=__doc__,
        formatter_class=HelpFormatter,
    )
    sources = p.add_argument_group("What to read")
    display = p.add_argument_group("Display")
    sources.add_argument(
        "--picker",
        action="append",
        default=[],
        metavar="URL",
        type=picker_url,
        help=f"a picker's metrics address, repeat for each (default {LOCAL_PICKERS[0]}, "
        "infergate up's first picker, and its next ones when they answer; with --kubernetes, "
        "the namespace's pickers through the API server)",
    )
    sources.add_argument(
        "--kubernetes",
        action="store_true",
        help="read a cluster namespace through the kubeconfig (KUBECONFIG, "
        "~/.kube/config or in-cluster)",
    )
    sources.add_argument("-n", "--namespace", default="default", help="with --kubernetes")
    how = display.add_mutually_exclusive_group()
    how.add_argument(
        "--once",
        action="store_true",
        help="one plain-text snapshot, then exit (1 when a source could not be read)",
    )
    how.add_argument("--watch", action="store_true", help="refresh (the default on a terminal)")
    display.add_argument(
        "--interval", type=interval, default=2.0, help="seconds between refreshes (0.2 to 3600)"
    )
    return p


async def run(args: argparse.Namespace) -> int:
    pickers, optional = args.picker, ()
    if not args.picker and not args.kubernetes:
        pickers, optional = list(LOCAL_PICKERS[:1]), LOCAL_PICKERS[1:]
    store = None
    if args.kubernetes:
        from kubernetes.config import ConfigException

        try:
            store = KubeStore.from_environment()
        except (ConfigException, OSError) as exc:
            print(f"infergate status: no cluster to read: {exc}", file=sys.stderr)
            return 2
    # a cluster's pickers through the API server, unless they are given (a port-forward)
    reader = Reader(pickers, store, args.namespace, not args.picker, optional)
    try:
        watch = args.watch or (not args.once and sys.stdout.isatty())
        if not watch:
            snap = await reader.snapshot()
            print(render_text(snap))
            return 0 if snap.ok else 1
        from rich.console import Console
        from rich.live import Live

        with Live(console=Console(), auto_refresh=False, screen=True) as live:
            while True:
                live.update(render_rich(await reader.snapshot()), refresh=True)
                await asyncio.sleep(args.interval)
    finally:
        if store is not None:
            store.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    watching = args.watch or (not args.once and sys.stdout.isatty())
    if watching and importlib.util.find_spec("rich") is None:
        print(
            "infergate status: the refreshing screen needs rich: pip install 'infergw[status]' "
            "(or run with --once for plain text)",
            file=sys.stderr,
        )
        return RICH_MISSING
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        return 0
