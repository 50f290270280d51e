"""`infergate status`: one terminal screen of a local stack or a cluster namespace — the pods
behind each picker with their load (running, waiting, in flight) and KV-cache use, the
cached-token share, the flow-control queue, errors by code; in a cluster the Models, their
pods, the autoscaler's last decisions and the recent Warning Events.

    infergate status                      # the local stack's picker (infergate up), refreshing
    infergate status --once               # one plain-text snapshot, for scripts and tests
    infergate status --kubernetes -n team # a namespace of a cluster (kubeconfig)

The refreshing screen needs `rich` (the `status` extra); `--once` prints plain text without it.
What it reads is untrusted (status_sources.py): unknown values are shown as `?`.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import sys
import time
import urllib.parse
from dataclasses import dataclass, field

from infergw.api.cli_help import HelpFormatter
from infergw.api.names import MODEL_LABEL
from infergw.cluster.store import AUTOSCALING_BINDING, EVENT, MODEL, POD, Store, StoreError
from infergw.stack.ports import StackPorts
from infergw.stack.status_sources import (
    ERROR_LIMIT,
    ERRORS,
    QUEUE,
    READY_PODS,
    REQUESTS,
    WAITING_FOR_CAPACITY,
    ClusterView,
    PickerView,
    cluster_pod,
    decisions,
    model_row,
    read_picker,
    recent_warnings,
    text,
)

RICH_MISSING = 3  # the exit status when the screen's extra is not installed
LOCAL_PICKER = f"http://127.0.0.1:{StackPorts().picker_metrics}"  # infergate up's picker 0
UNKNOWN = "?"


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


async def read_cluster(store: Store, namespace: str) -> ClusterView:
    """A namespace's Models, their pods, bindings' decisions and Warning Events."""
    view = ClusterView(namespace)
    try:
        models, _ = await store.list(MODEL, namespace)
        pods, _ = await store.list(POD, namespace)
        bindings, _ = await store.list(AUTOSCALING_BINDING, namespace)
    except (StoreError, OSError) as exc:
        view.error = text(f"cannot read namespace {namespace}: {exc}", ERROR_LIMIT)
        return view
    view.models = [model_row(m) for m in models[:64]]
    ours = [p for p in pods if MODEL_LABEL in ((p.get("metadata") or {}).get("labels") or {})]
    view.pods = [cluster_pod(p) for p in ours[:128]]
    view.decisions = [d for b in bindings[:32] for d in decisions(b)]
    try:
        events, _ = await store.list(EVENT, namespace)
    except (StoreError, OSError) as exc:  # e.g. no RBAC to read Events: the rest still shows
        view.error = text(f"cannot read Events: {exc}", ERROR_LIMIT)
    else:
        view.warnings = recent_warnings(events)
    return view


class Reader:
    """Takes snapshots; remembers error counts to show those since the last one."""

    def __init__(
        self, pickers: list[str], store: Store | None = None, namespace: str = "default"
    ) -> None:
        self.pickers, self.store, self.namespace = pickers, store, namespace
        self._errors: dict[str, float] = {}

    async def snapshot(self) -> Snapshot:
        views = await asyncio.gather(*(asyncio.to_thread(read_picker, u) for u in self.pickers))
        snap = Snapshot(time.time(), list(views))
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
        parts.append(Panel(Group(*head, table), title=escape(title)))
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
        help=f"a picker's metrics address, repeat for each (default {LOCAL_PICKER}, "
        "infergate up's first picker; none with --kubernetes)",
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
    display.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    return p


async def run(args: argparse.Namespace) -> int:
    pickers = args.picker or ([] if args.kubernetes else [LOCAL_PICKER])
    store = None
    if args.kubernetes:
        from kubernetes.config import ConfigException

        from infergw.cluster.kube_store import KubeStore

        try:
            store = KubeStore.from_environment()
        except (ConfigException, OSError) as exc:
            print(f"infergate status: no cluster to read: {exc}", file=sys.stderr)
            return 2
    reader = Reader(pickers, store, args.namespace)
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
                await asyncio.sleep(max(0.2, args.interval))
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
