"""session-affinity-scorer: the same x-session-id goes back to the same pod, for a while."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from infergw.epp.context import RequestContext
from infergw.epp.datastore import Endpoint
from infergw.epp.scheduling.framework import ProfileResult, SchedulingResult
from infergw.epp.scheduling.plugins import session_affinity
from infergw.epp.scheduling.plugins.session_affinity import SessionAffinityScorer
from tests.request_fixtures import bare_context

A, B, C = (
    Endpoint(name=f"{p}-rank-0", pod=p, address=f"10.0.0.{i}:8000")
    for i, p in enumerate("abc", start=1)
)
ALL = [A, B, C]


@pytest.fixture
def clock(monkeypatch):
    """A fake monotonic clock for the plugin: clock.now is what time.monotonic() returns."""
    fake = SimpleNamespace(now=1000.0)
    monkeypatch.setattr(session_affinity, "time", SimpleNamespace(monotonic=lambda: fake.now))
    return fake


def req(session: str | None) -> RequestContext:
    return bare_context(api="chat", session_id=session)


def send(s: SessionAffinityScorer, session: str | None, *targets: Endpoint) -> None:
    s.pre_request(req(session), SchedulingResult({"p": ProfileResult(list(targets))}, "p"))


def test_unknown_session_scores_zero_everywhere(clock):
    assert SessionAffinityScorer("s").score(req("new"), ALL) == [0.0, 0.0, 0.0]


def test_no_session_header_scores_zero_and_is_not_remembered(clock):
    s = SessionAffinityScorer("s")
    send(s, None, A)
    assert s.score(req(None), ALL) == [0.0, 0.0, 0.0]
    assert len(s._sessions) == 0


def test_a_session_returns_to_its_pod(clock):
    s = SessionAffinityScorer("s")
    send(s, "s1", B, C)  # B primary, C fallback
    assert s.score(req("s1"), ALL) == [0.0, 1.0, 0.0]
    assert s.score(req("s2"), ALL) == [0.0, 0.0, 0.0]


def test_the_latest_pod_wins(clock):
    s = SessionAffinityScorer("s")
    send(s, "s1", A)
    send(s, "s1", C)
    assert s.score(req("s1"), ALL) == [0.0, 0.0, 1.0]


def test_pod_not_among_candidates_scores_nothing(clock):
    s = SessionAffinityScorer("s")
    send(s, "s1", A)
    assert s.score(req("s1"), [B, C]) == [0.0, 0.0]


def test_no_targets_records_nothing(clock):
    s = SessionAffinityScorer("s")
    send(s, "s1")
    assert s.score(req("s1"), ALL) == [0.0, 0.0, 0.0]


def test_ttl_expiry(clock):
    s = SessionAffinityScorer("s", {"ttlSeconds": 10})
    send(s, "s1", A)
    clock.now += 10
    assert s.score(req("s1"), ALL) == [1.0, 0.0, 0.0]  # still within the TTL
    clock.now += 0.001
    assert s.score(req("s1"), ALL) == [0.0, 0.0, 0.0]


def test_default_ttl_is_five_minutes(clock):
    s = SessionAffinityScorer("s")
    send(s, "s1", A)
    clock.now += 299
    assert s.score(req("s1"), ALL)[0] == 1.0
    clock.now += 2
    assert s.score(req("s1"), ALL)[0] == 0.0


def test_each_request_extends_the_ttl(clock):
    s = SessionAffinityScorer("s", {"ttlSeconds": 10})
    send(s, "s1", A)
    for _ in range(5):
        clock.now += 8
        assert s.score(req("s1"), ALL)[0] == 1.0
        send(s, "s1", A)
    clock.now += 11
    assert s.score(req("s1"), ALL)[0] == 0.0


def test_an_expired_session_can_start_again(clock):
    s = SessionAffinityScorer("s", {"ttlSeconds": 1})
    send(s, "s1", A)
    clock.now += 5
    send(s, "s1", B)
    assert s.score(req("s1"), ALL) == [0.0, 1.0, 0.0]


def test_max_sessions_drops_the_least_recent(clock):
    s = SessionAffinityScorer("s", {"maxSessions": 2})
    send(s, "s1", A)
    send(s, "s2", B)
    send(s, "s1", A)  # s1 is now the most recent
    send(s, "s3", C)  # drops s2
    assert len(s._sessions) == 2
    assert s.score(req("s1"), ALL) == [1.0, 0.0, 0.0]
    assert s.score(req("s2"), ALL) == [0.0, 0.0, 0.0]
    assert s.score(req("s3"), ALL) == [0.0, 0.0, 1.0]


def test_many_sessions_stay_within_the_bound(clock):
    s = SessionAffinityScorer("s", {"maxSessions": 100})
    for i in range(1000):
        send(s, f"s{i}", ALL[i % 3])
    assert len(s._sessions) == 100
    assert s.score(req("s999"), ALL) == [1.0, 0.0, 0.0]  # 999 % 3 == 0
    assert s.score(req("s0"), ALL) == [0.0, 0.0, 0.0]
