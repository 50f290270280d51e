"""What the picker exports, read from the code: the registry of a picker built in this process
with every optional part on (flow control, the KV-event index, replica sync and shared
scrapes, the Redis index's counters), as rows of the README's metrics table. The README test
and the dashboard test both read it."""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from infergw.epp.app import build_picker, stop_picker
from infergw.epp.metric_aliases import LLMD_ALIASES, LlmdAliases
from infergw.epp.options import parse_options
from infergw.kvindex.redis_index import RedisIndexMetrics
from tests.conftest import free_port

# Every optional part of the picker that registers metrics.
FULL_CONFIG = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: precise-prefix-cache-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: precise-prefix-cache-scorer
  - pluginRef: max-score-picker
flowControl: {}
"""
POOL = """
apiVersion: inference.networking.k8s.io/v1
kind: InferencePool
metadata: {name: pool, namespace: default}
spec:
  selector: {matchLabels: {app: sim}}
  targetPorts: [{number: 8000}]
  endpointPickerRef: {name: epp, port: {number: 9002}}
"""
SUFFIXES = {"counter": "_total", "info": "_info"}


@dataclass(frozen=True, slots=True)
class Row:
    name: str  # as exposed (a counter's with `_total`)
    type: str
    labels: tuple[str, ...]
    help: str

    def markdown(self) -> str:
        labels = ", ".join(f"`{label}`" for label in self.labels) or "—"
        text = " ".join(self.help.split()).replace("|", "\\|")
        return f"| `{self.name}` | {self.type} | {labels} | {text} |"


async def full_registry(tmp_path) -> CollectorRegistry:
    """The registry of a picker with every optional part on, built and stopped here."""
    config, pool = tmp_path / "config.yaml", tmp_path / "pool.yaml"
    config.write_text(FULL_CONFIG)
    pool.write_text(POOL)
    opts = parse_options(
        [
            "--provider=file",
            f"--pool-file={pool}",
            "--pool-name=pool",
            f"--config-file={config}",
            "--secure-serving=false",
            f"--kv-events-bind=tcp://127.0.0.1:{free_port()}",
            f"--replica-sync-bind=tcp://127.0.0.1:{free_port()}",
            "--share-scrapes",
        ]
    )
    picker = await build_picker(opts)
    try:
        RedisIndexMetrics(picker.metrics.registry)  # registered with --kv-index-backend redis
        return picker.metrics.registry
    finally:
        with contextlib.suppress(Exception):
            await stop_picker(picker)


def rows(registry: CollectorRegistry) -> list[Row]:
    """One row per family the registry exports, and one per llm-d alias, sorted by name."""
    found: dict[str, Row] = {}
    for collector in list(registry._collector_to_names):
        if isinstance(collector, LlmdAliases):
            continue
        for family in collector.collect():
            labels = _labels(collector, family)
            found[family.name] = Row(
                family.name + SUFFIXES.get(family.type, ""),
                family.type,
                labels,
                family.documentation,
            )
    for name, alias in LLMD_ALIASES.items():
        if name in found:
            ours = found[name]
            found[alias.name] = Row(
                alias.name + SUFFIXES.get(ours.type, ""),
                ours.type,
                tuple(alias.labels.get(label, label) for label in ours.labels),
                f"{ours.help} (llm-d's name for `{ours.name}`)",
            )
    return sorted(found.values(), key=lambda r: r.name)


def _labels(collector, family) -> tuple[str, ...]:
    """The family's label names: declared, else seen on its samples (an info's keys)."""
    declared = collector._labelnames if isinstance(collector, MetricWrapperBase) else None
    if declared is None:
        declared = getattr(family, "_labelnames", ())
    seen = [k for s in family.samples for k in s.labels if k not in declared and k != "le"]
    return tuple(declared) + tuple(dict.fromkeys(seen))


TABLE_START = "<!-- metrics-table: start -->"
TABLE_END = "<!-- metrics-table: end -->"
HEADER = "| name | type | labels | meaning |\n|---|---|---|---|"


def table(found: list[Row]) -> str:
    return "\n".join([HEADER, *(r.markdown() for r in found)])


def readme_table(readme: str) -> str:
    match = re.search(re.escape(TABLE_START) + r"\n(.*?)\n" + re.escape(TABLE_END), readme, re.S)
    assert match, f"README has no {TABLE_START} … {TABLE_END} section"
    return match.group(1)


if __name__ == "__main__":  # python -m tests.metric_catalog: the table README.md should hold
    import asyncio
    import tempfile
    from pathlib import Path

    print(table(rows(asyncio.run(full_registry(Path(tempfile.mkdtemp()))))))
