"""Read the few metrics the picker needs from a model server's Prometheus text.

Each engine names them differently; ENGINES maps our neutral fields to its names. A real
vLLM page is 55 KB and 650 lines of which the picker needs four or five: `sample_lines` finds
those with a substring search per wanted name (no split of the whole page), and only they are
parsed, so a page costs a few tens of microseconds, and the scraper can tell an unchanged page
by comparing them.

A page with an impossible value (NaN, ±inf, a negative count, KV usage outside 0..1) is
refused whole with InvalidMetricValue: one poisoned number makes the page untrustworthy,
and the endpoint keeps its last good metrics until they go stale (then scorers treat it as
saturated), so a pod that reports garbage loses traffic instead of attracting it.
"""

from __future__ import annotations

import functools
import math
import re
import time
from dataclasses import dataclass

from infergw.api.engines import ENGINES, EngineNames
from infergw.epp.datastore import EndpointMetrics

# vLLM before v1 called KV usage this; still seen in the wild.
_LEGACY_KV = {"vllm": "vllm:gpu_cache_usage_perc"}

# Adapters one lora_requests_info sample may name (running or waiting). vLLM runs at most
# max_loras at once, a few dozen; the LoRA scorer and filter look at these sets for every
# request and endpoint, so a page naming more is refused like any impossible value.
MAX_LORA_NAMES = 1024

_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


class MetricsParseError(ValueError):
    pass


class InvalidMetricValue(MetricsParseError):
    """The page parses, but a value the picker uses cannot be true."""


def _check(name: str, value: float, upper: float = math.inf) -> float:
    """value when it is a finite number in 0..upper, else InvalidMetricValue."""
    if not (math.isfinite(value) and 0.0 <= value <= upper):
        raise InvalidMetricValue(f"{name} = {value!r} is not a number in 0..{upper}")
    return value


def _split(line: str) -> tuple[str, str, float]:
    """name, raw labels, value of one sample line."""
    brace = line.find("{")
    if brace >= 0:
        close = line.rfind("}")
        if close < brace:
            raise MetricsParseError(f"unbalanced braces in {line[:80]!r}")
        name, labels, rest = line[:brace], line[brace + 1 : close], line[close + 1 :]
    else:
        name, _, rest = line.partition(" ")
        labels = ""
    fields = rest.split()
    if not fields:
        raise MetricsParseError(f"no value in {line[:80]!r}")
    try:
        return name, labels, float(fields[0])
    except ValueError as exc:
        raise MetricsParseError(f"bad value in {line[:80]!r}") from exc


@dataclass(frozen=True, slots=True)
class Vocabulary:
    """One engine's names of the metrics the picker reads, in a fixed order."""

    engine: str
    names: EngineNames
    legacy_kv: str | None
    wanted: tuple[str, ...]


@functools.cache
def vocabulary(engine: str) -> Vocabulary:
    names = ENGINES.get(engine)
    if names is None:
        raise MetricsParseError(f"unknown engine type {engine!r}; known: {sorted(ENGINES)}")
    legacy_kv = _LEGACY_KV.get(engine)
    candidates = (
        names.waiting,
        names.running,
        names.kv_usage,
        names.cache_info,
        names.lora_info,
        legacy_kv,
    )
    wanted = tuple(dict.fromkeys(n for n in candidates if n is not None))
    return Vocabulary(engine, names, legacy_kv, wanted)


def _metric_name(line: str) -> str:
    """The name of a sample line: up to its labels, or to the first space."""
    end = line.find("{")
    return line[:end] if end >= 0 else line.partition(" ")[0]


def sample_lines(text: str, wanted: tuple[str, ...]) -> tuple[str, ...]:
    """The sample lines of the `wanted` metrics, grouped by name in `wanted`'s order and in
    page order within a name. Lines end at "\n" (the exposition format's only separator; a
    CR before it is dropped); comments never match, as they start with "#"."""
    out: list[str] = []
    for name in wanted:
        needle = "\n" + name
        end = _take(text, 0, name, out) if text.startswith(name) else 0
        at = text.find(needle, end)
        while at >= 0:
            end = _take(text, at + 1, name, out)
            at = text.find(needle, end)  # text[end] is the "\n" that ends the line taken
    return tuple(out)


def _take(text: str, start: int, name: str, out: list[str]) -> int:
    """Append the line at `start` if it is a sample of `name` (not of a longer name that
    starts with it); return where the line ends."""
    end = text.find("\n", start + len(name))
    if end < 0:
        end = len(text)
    line = text[start:end]
    if line.endswith("\r"):
        line = line[:-1]
    if _metric_name(line) == name:
        out.append(line)
    return end


def parse(text: str, engine: str, now: float | None = None) -> EndpointMetrics:
    vocab = vocabulary(engine)
    return parse_lines(sample_lines(text, vocab.wanted), vocab, now)


def parse_lines(
    lines: tuple[str, ...], vocab: Vocabulary, now: float | None = None
) -> EndpointMetrics:
    """The metrics of the lines sample_lines selected."""
    names, legacy_kv = vocab.names, vocab.legacy_kv
    m = EndpointMetrics(updated_at=time.monotonic() if now is None else now)
    kv: list[float] = []
    kv_legacy: list[float] = []  # used only when the current name is absent
    lora_ts = -1.0
    found = set()
    for line in lines:
        name, labels, value = _split(line)
        found.add(name)
        if name == names.waiting:
            m.waiting += _check(name, value)  # summed over engines (data-parallel ranks)
        elif name == names.running:
            m.running += _check(name, value)
        elif name == names.kv_usage:
            kv.append(_check(name, value, 1.0))
        elif name == legacy_kv:
            kv_legacy.append(_check(name, value, 1.0))
        elif name == names.cache_info:
            lab = _labels(labels)
            m.block_size = _int(lab.get(names.block_size_label))
            m.num_blocks = _int(lab.get(names.num_blocks_label))
        elif name == names.lora_info and value > lora_ts:
            lora_ts = value  # the value is a timestamp: the newest sample wins
            lab = _labels(labels)
            m.running_loras = _names(name, "running", lab.get("running_lora_adapters"))
            m.waiting_loras = _names(name, "waiting", lab.get("waiting_lora_adapters"))
            m.max_loras = _int(lab.get("max_lora"))
    m.kv_usage = max(kv or kv_legacy or [0.0])  # the fullest engine bounds admission
    missing = {names.waiting, names.running} - found
    if missing:
        raise MetricsParseError(f"{vocab.engine} metrics lack {sorted(missing)}")
    # Finite samples can still sum past the largest float.
    _check(names.waiting, m.waiting)
    _check(names.running, m.running)
    return m


# Label sets of info metrics (cache config, LoRA state) repeat from page to page, and vLLM's
# cache_config_info has forty labels: their parse is kept, for label sets of ordinary size.
_MAX_CACHED_LABELS = 4096


@functools.lru_cache(maxsize=1024)
def _cached_labels(labels: str) -> dict[str, str]:
    return dict(_LABEL.findall(labels))


def _labels(labels: str) -> dict[str, str]:
    """name → value of a sample's labels; the dict may be shared: read it only."""
    if len(labels) > _MAX_CACHED_LABELS:
        return dict(_LABEL.findall(labels))
    return _cached_labels(labels)


def _int(value: str | None) -> int | None:
    """A count from a label; absent, unparsable or negative: unknown."""
    try:
        number = int(value) if value not in (None, "", "None") else None
    except ValueError:
        return None
    return number if number is not None and number >= 0 else None


def _names(metric: str, which: str, value: str | None) -> frozenset[str]:
    names = frozenset(v for v in (value or "").split(",") if v)
    if len(names) > MAX_LORA_NAMES:
        raise InvalidMetricValue(
            f"{metric} names {len(names)} {which} adapters, more than {MAX_LORA_NAMES}"
        )
    return names
