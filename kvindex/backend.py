"""What the rest of kvindex asks of a block index, so the in-memory one (kvindex.index) and the
shared one in Redis (kvindex.redis_index) stand in for each other.

Two sides, because in the shared index they are two objects in two places:
- `BlockIndex`: what kvindex.translate writes into (the KV events' add / remove / clear_pod);
- `PrefixIndex`: what kvindex.cache reads (lookup, match_lengths, add_speculative). An index
  that lives elsewhere also offers `RemotePrefixIndex.fetch`: one round trip that reads what
  the pods hold of a prompt, after which the prompt is scored from that `PrefixView` without
  waiting (scheduling is synchronous; the scorer fetches in its async prepare step).
`kvindex.index.KVBlockIndex` is both sides and its own view. A write side others read too
(`SharedBlockIndex`, the Redis writer) can also let a pod go without clearing it there.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol, runtime_checkable

from infergw.kvindex.index import Tier


class PrefixView(Protocol):
    """Per pod, how much of a prompt's keys it holds consecutively from the first."""

    def lookup(
        self,
        keys: list[int],
        pods: Iterable[str] | None = None,
        *,
        tier_weights: Mapping[str, float] = ...,
    ) -> dict[str, float]: ...

    def match_lengths(
        self, keys: list[int], pods: Iterable[str] | None = None
    ) -> dict[str, int]: ...


class PrefixIndex(PrefixView, Protocol):
    """The read side kvindex.cache uses."""

    @property
    def block_size(self) -> int: ...

    def add_speculative(self, pod: str, keys: list[int]) -> None: ...


@runtime_checkable
class RemotePrefixIndex(PrefixIndex, Protocol):
    """A read side behind a network round trip: `fetch` reads once, the view answers."""

    async def fetch(self, keys: list[int]) -> PrefixView: ...


class BlockIndex(Protocol):
    """The write side kvindex.translate uses."""

    @property
    def block_size(self) -> int: ...
    @property
    def shard_count(self) -> int: ...

    def add(self, pod: str, keys: Sequence[int], tier: Tier, copies: int = 1) -> None: ...
    def remove(self, pod: str, keys: Sequence[int], tier: Tier) -> list[int]: ...
    def holds_any(self, pod: str, keys: Iterable[int]) -> bool: ...
    def take_evictions(self) -> dict[str, int]: ...
    def clear_pod(self, pod: str, keys: Iterable[int] = ()) -> None: ...
    def stats(self) -> dict: ...
    def memory_bytes(self, seen: set[int] | None = None) -> int: ...


@runtime_checkable
class SharedBlockIndex(BlockIndex, Protocol):
    """A write side whose entries other replicas read: when another replica takes a pod over
    (epp/kv_shards.py), this one forgets it locally and leaves the shared entries alone."""

    def release_pod(self, pod: str, keys: Iterable[int] = ()) -> None: ...
