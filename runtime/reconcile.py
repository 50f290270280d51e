"""The sidecar's decision, a pure function of what it sees: the adapters wanted, those the
engine serves, those present on disk, and what earlier attempts left (failures and back-off).
One pass takes every step that is due; the next pass looks again (level-triggered: a step
lost, an engine restarted, a file edited twice, all end the same).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from infergw.api.lora_adapters import INVALID_ADAPTER, Adapter, Refused

BASE_BACKOFF = 1.0  # seconds after a first failure; doubled per failure
MAX_BACKOFF = 60.0
MAX_DOUBLINGS = 60  # 2**60 s outlasts any --max-backoff
LOADED = "Loaded"
PENDING = "Pending"
FAILED = "Failed"

Kind = Literal["download", "load", "unload"]


@dataclass(frozen=True, slots=True)
class Step:
    kind: Kind
    name: str


@dataclass(slots=True)
class Attempts:
    """What went wrong with one adapter, and when to try it again."""

    failures: int = 0
    retry_at: float = 0.0
    reason: str | None = None
    message: str | None = None

    def failed(self, reason: str, message: str, now: float, max_backoff: float) -> None:
        self.failures += 1
        # The exponent stops growing once past any cap: 2**1100 as a float overflows, and an
        # adapter that failed for days would then raise here on every pass, retried at once.
        doubling = min(self.failures - 1, MAX_DOUBLINGS)
        self.retry_at = now + min(BASE_BACKOFF * 2**doubling, max_backoff)
        self.reason, self.message = reason, message


@dataclass(slots=True)
class State:
    """What the sidecar remembers between passes."""

    attempts: dict[str, Attempts] = field(default_factory=dict)
    # name -> the adapter as it was loaded: a name whose source or path changes is reloaded
    loaded: dict[str, Adapter] = field(default_factory=dict)

    def of(self, name: str) -> Attempts:
        return self.attempts.setdefault(name, Attempts())

    def succeeded(self, name: str) -> None:
        self.attempts.pop(name, None)

    def forget_unserved(self, served: set[str]) -> None:
        """An adapter the engine no longer serves (it restarted) is not loaded any more."""
        self.loaded = {n: a for n, a in self.loaded.items() if n in served}


def decide(
    desired: dict[str, Adapter],
    served: set[str],
    present: set[str],
    state: State,
    now: float,
) -> list[Step]:
    """The steps due now: unload what is served and not wanted (or wanted as something else),
    then for each wanted adapter not served, download it if it is to be downloaded and is not
    present, else load it — each unless its back-off has not passed."""
    steps: list[Step] = []
    for name in sorted(served):
        want = desired.get(name)
        had = state.loaded.get(name)
        if want is None or (had is not None and had != want):
            if _due(state, name, now):
                steps.append(Step("unload", name))
    for name, adapter in sorted(desired.items()):
        # served as something else: unloaded above, loaded again on a later pass
        if name in served or not _due(state, name, now):
            continue
        if adapter.download and name not in present:
            steps.append(Step("download", name))
        else:
            steps.append(Step("load", name))
    return steps


def _due(state: State, name: str, now: float) -> bool:
    a = state.attempts.get(name)
    return a is None or a.retry_at <= now


@dataclass(frozen=True, slots=True)
class AdapterStatus:
    name: str
    state: str  # LOADED, PENDING, FAILED
    reason: str | None = None
    message: str | None = None
    failures: int = 0


def statuses(
    desired: dict[str, Adapter], served: set[str], refused: list[Refused], state: State
) -> list[AdapterStatus]:
    """Every wanted adapter's state, and every refused entry's."""
    out = []
    for name in sorted(desired):
        a = state.attempts.get(name)
        if name in served and state.loaded.get(name) in (None, desired[name]):
            out.append(AdapterStatus(name, LOADED))
        elif a is not None and a.reason is not None:
            out.append(AdapterStatus(name, FAILED, a.reason, a.message, a.failures))
        else:
            out.append(AdapterStatus(name, PENDING))
    out += [AdapterStatus(r.name, FAILED, INVALID_ADAPTER, r.message) for r in refused]
    return out
