"""The optional features a scheduling plugin may offer the picker, as typed protocols: the
picker finds them by isinstance, not by probing attribute names."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Protocol, runtime_checkable

if TYPE_CHECKING:
    from epp.context import RequestContext
    from epp.metrics import PickerMetrics
    from kvindex.cache import KVCache


@runtime_checkable
class UsesKVCache(Protocol):
    """Scores from the KV-event index: the picker builds the KV cache only if a plugin is one."""

    def use_kv_cache(self, kv: KVCache) -> None: ...


@runtime_checkable
class PrefixSource(Protocol):
    """Knows how much of a request's prompt a pod holds (for the P/D decision)."""

    precise: ClassVar[bool]  # from what pods report holding, not a guess

    def cached_prompt(self, ctx: RequestContext, address: str) -> tuple[int, int] | None: ...


@runtime_checkable
class ForgetsServers(Protocol):
    """Keeps per-pod state that must go when the pod leaves the pool."""

    def forget_server(self, address: str) -> None: ...


@runtime_checkable
class CountsInMetrics(Protocol):
    """Counts its own decisions in the picker's metrics."""

    def bind_metrics(self, metrics: PickerMetrics) -> None: ...


@runtime_checkable
class DebugReport(Protocol):
    """Reports its recent decisions at a debug endpoint."""

    def debug(self) -> dict: ...
