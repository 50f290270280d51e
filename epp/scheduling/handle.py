"""What a scheduling plugin may reach, given to its factory, and the features the picker asks
of the plugins that offer them.

Every plugin is made by its type's factory (`Plugin.create`, called by the registry) with a
`Handle`: the KV cache facade (built only when a plugin type of the config says it
`needs_kv_cache`), the picker's metrics, the config's plugins by name, and (several
replicas) the channel replicas share decisions on. A plugin takes what
it needs in its constructor; nothing is pushed into it afterwards.

The protocols are what the picker *calls* on a plugin that offers them; it finds them by
isinstance, not by probing attribute names."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, ClassVar, Protocol, runtime_checkable

if TYPE_CHECKING:
    from infergw.epp.context import RequestContext
    from infergw.epp.metrics import PickerMetrics
    from infergw.epp.replica_sync import ReplicaSync
    from infergw.epp.scheduling.framework import Plugin
    from infergw.kvindex.cache import KVCache


@dataclass(frozen=True, slots=True)
class Handle:
    """What the picker lends its plugins. Both services are None where there is none (the KV
    cache when no configured plugin type needs it; metrics in a test that counts nothing)."""

    kv_cache: KVCache | None = None
    metrics: PickerMetrics | None = None
    # The config's plugins by name, read-only: it fills as the config builds them, so it is
    # complete by the time a profile handler configures itself.
    plugins: Mapping[str, Plugin] = field(default_factory=lambda: MappingProxyType({}))
    # With several picker replicas: where a plugin shares its decisions with the others
    # (epp/replica_sync.py), so they keep choosing alike. None with one picker.
    replicas: ReplicaSync | None = None


@runtime_checkable
class PrefixSource(Protocol):
    """Knows how much of a request's prompt a pod holds (for the P/D decision)."""

    precise: ClassVar[bool]  # from what pods report holding, not a guess

    def cached_prompt(self, ctx: RequestContext, address: str) -> tuple[int, int] | None: ...


@runtime_checkable
class HeldShare(Protocol):
    """Knows, once it has scored a request, the share of its prompt each pod held then
    (before this request's own entries: the prefill-backlog scorer's charge)."""

    precise: ClassVar[bool]

    def held_share(self, ctx: RequestContext, address: str) -> float | None: ...


@runtime_checkable
class ForgetsServers(Protocol):
    """Keeps per-pod state that must go when the pod leaves the pool."""

    def forget_server(self, address: str) -> None: ...


@runtime_checkable
class DebugReport(Protocol):
    """Reports its recent decisions at a debug endpoint."""

    def debug(self) -> dict: ...
