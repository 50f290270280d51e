"""Receive vLLM KV events over ZMQ and keep an index in step with every pod.

Two modes, as llm-d runs them: **central** (we bind one SUB socket and every pod's PUB
connects to it) and **per-pod** (we connect a SUB to each pod's PUB as pods appear, so several
picker replicas can each build an index). Per pod we track the sequence number: the next one
is applied; a gap asks the pod's replay (ROUTER) socket for what was missed; a number that
goes backwards means the engine restarted, so the pod's entries are dropped and replayed from
0.

Whom we believe: in per-pod mode the socket we connected to names the pod, and nothing
listens. In central mode anyone who reaches the SUB can publish, so a message is applied only
if its topic names a pod of the pool (`is_member`; others are dropped before any per-pod state
exists) and, over TCP, if it came from that pod's own address (libzmq's "Peer-Address" of the
frame). A TCP peer address cannot be forged off-path, so an outsider can neither add entries
for a pod nor flush them with a backwards sequence number. A proxy that hides pod addresses
(a mesh sidecar) makes every message fail that check: use per-pod mode there.

A bad message costs that message only: every failure while handling one is dropped and
counted by reason (`dropped`), and a receive loop that fails anyway is logged and restarted.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import zmq
import zmq.asyncio

from infergw.kvindex.events import (
    AllBlocksCleared,
    EventBatch,
    KVEvent,
    KVEventDecodeError,
    KVMessage,
    decode_message,
    decode_replay_frames,
    parse_topic,
)
from infergw.kvindex.fault_log import FaultLog

log = logging.getLogger("kvindex.subscriber")

REPLAY_IDLE_S = 2.0  # a replay socket silent this long is given up on
REPLAY_TOTAL_S = 120.0
RESTART_DELAY_S = 1.0  # before a failed receive loop runs again: a lasting fault cannot spin
MAX_BUFFERED = 10_000  # live messages kept per pod while its replay runs; later ones are gaps
# Bigger frames make libzmq drop the connection: a real batch is well under 1 MiB (a 128k-token
# BlockStored is ~0.7 MB), so this only stops a peer from making us allocate gigabytes.
MAX_FRAME_BYTES = 64 << 20


class EventSink(Protocol):
    def apply_events(self, pod: str, model: str, events: Sequence[KVEvent]) -> int:
        """Apply one batch's events in order; how many the sink could not take (each such
        event is skipped, the rest still apply)."""
        ...

    def clear_pod(self, pod: str) -> None: ...
    def release_pod(self, pod: str) -> None: ...


class SimpleSink(Protocol):
    def apply(self, pod: str, model: str, event: KVEvent) -> None: ...
    def clear_pod(self, pod: str) -> None: ...


def apply_each(sink: SimpleSink, pod: str, model: str, events: Sequence[KVEvent]) -> int:
    """`apply_events` for a sink that takes one event at a time: AllBlocksCleared clears the
    pod, an event that raises is skipped and counted."""
    rejected = 0
    for event in events:
        try:
            if isinstance(event, AllBlocksCleared):
                sink.clear_pod(pod)
            else:
                sink.apply(pod, model, event)
        except Exception as exc:  # one event the index cannot take; the rest still count
            rejected += 1
            log.debug("index rejected an event from %s: %r", pod, exc)
    return rejected


class _Dropped(Exception):
    """A message we refuse; `reason` labels the counter; `pod` is the pool's pod it came
    from, when that is known."""

    def __init__(self, reason: str, detail: str, pod: str | None = None) -> None:
        super().__init__(detail)
        self.reason = reason
        self.pod = pod


class _PodState:
    __slots__ = (
        "buffered",
        "last_seq",
        "model",
        "overflowed",
        "replay_endpoint",
        "replaying",
        "socket",
    )

    def __init__(self) -> None:
        self.last_seq: int | None = None
        self.model = ""  # from the live topic; older replays carry no topic
        self.replay_endpoint: str | None = None
        self.replaying = False
        self.buffered: list[KVMessage] = []  # live messages that arrive during a replay
        self.overflowed = False  # some did not fit: the replay's own gaps, for another replay
        self.socket: zmq.asyncio.Socket | None = None  # per-pod mode only


def same_host(pod: str, peer: str) -> bool:
    """Whether pod "ip:port" (or "[v6]:port") is at the IP address `peer`."""
    try:
        a = ipaddress.ip_address(pod.rpartition(":")[0].strip("[]"))
        b = ipaddress.ip_address(peer)
    except ValueError:
        return False
    # An IPv4 publisher seen through a dual-stack socket is ::ffff:a.b.c.d.
    a = getattr(a, "ipv4_mapped", None) or a
    b = getattr(b, "ipv4_mapped", None) or b
    return a == b


def _sub_socket(ctx: zmq.asyncio.Context) -> zmq.asyncio.Socket:
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
    sock.setsockopt(zmq.IPV6, 1)  # a pod network may be IPv6 ($POD_IP, a pod's address)
    return sock


class KVEventSubscriber:
    def __init__(
        self,
        sink: EventSink,
        *,
        replay_endpoint_for: Callable[[str], str | None] | None = None,
        model_for: Callable[[str], str | None] | None = None,
        is_member: Callable[[str], bool] | None = None,
        decode_tokens: bool = True,
    ) -> None:
        self.sink = sink
        # False: stores' token ids are decoded only where a request starts (events.decode_batch)
        self.decode_tokens = decode_tokens
        self.replay_endpoint_for = replay_endpoint_for or (lambda _pod: None)
        # Per-pod mode only: the model of a pod whose topic does not name it (vLLM's
        # default topic is empty; the socket already says which pod it is).
        self.model_for = model_for or (lambda _pod: None)
        # Central mode: whether a topic's pod is in the pool (by default, every pod is).
        self.is_member = is_member or (lambda _pod: True)
        self.counts: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()  # messages refused, by reason
        # A pool pod's refused messages and restarts are logged per (pod, kind), at most one
        # line per interval each: one pod's flood cannot hide another's first fault.
        self.faults = FaultLog(log)
        self._restarts = FaultLog(log, level=logging.INFO)
        self._ctx = zmq.asyncio.Context()
        self._pods: dict[str, _PodState] = {}
        self._central: zmq.asyncio.Socket | None = None
        self._check_peer = False
        self._tasks: set[asyncio.Task] = set()
        self._drop = 0  # test hook: live messages to discard on purpose
        self._closed = False

    # ---- setup -----------------------------------------------------------------------

    def bind(self, endpoint: str) -> None:
        """Central mode: every pod's PUB connects here."""
        sock = _sub_socket(self._ctx)
        sock.setsockopt(zmq.SUBSCRIBE, b"kv@")
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.bind(endpoint)
        self._central = sock
        # Only TCP frames carry a peer address; ipc/inproc access is the filesystem's/process's.
        self._check_peer = endpoint.startswith("tcp://")
        self._spawn(self._supervise(f"central receive on {endpoint}", lambda: self._receive(sock)))

    def connect_pod(self, pod: str, pub_endpoint: str, replay_endpoint: str | None) -> None:
        """Per-pod mode: subscribe to one pod's PUB socket and catch up from its replay."""
        state = self._pods.setdefault(pod, _PodState())
        if state.socket is not None:
            return
        sock = _sub_socket(self._ctx)
        sock.setsockopt(zmq.SUBSCRIBE, b"")  # every topic: vLLM's default one is empty
        sock.connect(pub_endpoint)
        state.socket = sock
        state.replay_endpoint = replay_endpoint
        what = f"receive from {pod} ({pub_endpoint})"
        self._spawn(self._supervise(what, lambda: self._receive(sock, pod)))
        if replay_endpoint:
            self._start_replay(pod, 0)

    def forget_pod(self, pod: str) -> None:
        """The pod left the pool: its entries go, and so does its socket."""
        self._close_pod(pod)
        self.sink.clear_pod(pod)

    def release_pod(self, pod: str) -> None:
        """Per-pod mode: another subscriber follows the pod now: its socket goes, and the sink
        forgets it without clearing what others read (a shared index)."""
        self._close_pod(pod)
        self.sink.release_pod(pod)

    def _close_pod(self, pod: str) -> None:
        state = self._pods.pop(pod, None)
        if state is not None and state.socket is not None:
            state.socket.close(0)

    def drop_next(self, n: int) -> None:
        """Test hook: discard the next n live messages, as a congested network would."""
        self._drop += n

    async def close(self) -> None:
        self._closed = True  # a replay that ends now starts no other
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._ctx.destroy(linger=0)  # closes every socket it made, then terminates

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.counts["task_failures"] += 1
            log.error("KV events: a task failed", exc_info=task.exception())

    async def _supervise(self, what: str, run: Callable[[], Awaitable[None]]) -> None:
        """Run a receive loop until it returns (its socket closed): one that raises is
        logged and run again, so precise routing never stops silently."""
        while True:
            try:
                await run()
                return
            except Exception:
                self.counts["task_restarts"] += 1
                log.exception("KV events: %s failed; restarting it", what)
            await asyncio.sleep(RESTART_DELAY_S)

    def _refuse(self, reason: str, detail: str, pod: str | None = None) -> None:
        n = self.dropped[reason] = self.dropped[reason] + 1
        if pod is not None:
            self.faults.note(pod, reason, f"message dropped: {detail}")
        elif n & (n - 1) == 0:  # the 1st, 2nd, 4th, 8th…: a flood cannot flood the log
            # No pod of the pool to name (a topic that names none, or cannot be read): the
            # sender is whoever reached the socket, so no per-sender state is kept.
            log.warning("KV event message dropped (%s, %d so far): %s", reason, n, detail)

    # ---- live path -------------------------------------------------------------------

    async def _receive(self, sock: zmq.asyncio.Socket, from_pod: str | None = None) -> None:
        """Central mode (from_pod None): the topic names the pod. Per pod: the socket does."""
        while True:
            try:
                frames = await sock.recv_multipart(copy=False)
            except zmq.ZMQError:
                if sock.closed:  # the pod left (forget_pod) or we are closing
                    return
                raise
            self.counts["received"] += 1
            if self._drop:
                self._drop -= 1
                self.counts["dropped_by_test_hook"] += 1
                continue
            try:
                self._on_frames(frames, from_pod)
            except _Dropped as d:
                self._refuse(d.reason, str(d), d.pod or from_pod)
            except Exception as exc:  # a bug must cost this message, not the loop
                self._refuse("error", f"handling a message failed: {exc!r}", from_pod)
                log.debug("KV event handling failed", exc_info=True)

    def _on_frames(self, frames: list[zmq.Frame], from_pod: str | None) -> None:
        # Central mode: whose message it is, from its topic frame, before its payload is
        # decoded, so that an outsider's costs next to nothing (its 64 MiB batches, decoded
        # first, were slower to refuse than to send: the receive queue grew without end).
        sender = from_pod if from_pod is not None else self._admit(frames)
        try:
            msg = decode_message(frames, tokens=self.decode_tokens)
            pod = from_pod or parse_topic(msg.topic)[0]
        except KVEventDecodeError as exc:
            raise _Dropped("malformed", str(exc), sender) from None
        if from_pod is not None and self._pods.get(from_pod) is None:
            raise _Dropped("unknown_pod", f"{from_pod} left the pool")
        try:
            self._model_of(pod, msg.topic)
            self._on_message(pod, msg)
        except _Dropped as d:
            d.pod = pod
            raise

    def _admit(self, frames: list[zmq.Frame]) -> str | None:
        """Central mode: the pod a message's topic names, if that pod is in the pool and the
        message came from its host (else _Dropped); None if the topic cannot be read (the
        decoder then says what is wrong)."""
        try:
            topic = bytes(frames[0])
            pod = parse_topic(topic)[0]
        except (KVEventDecodeError, IndexError, TypeError):
            return None
        shown = topic.decode("utf-8", "replace")
        if not self.is_member(pod):
            raise _Dropped("unknown_pod", f"topic {shown!r} names a pod not in the pool")
        if self._check_peer:
            try:
                peer = frames[0].get("Peer-Address")
            except (AttributeError, zmq.ZMQError):
                peer = ""
            if not same_host(pod, peer):
                raise _Dropped(
                    "peer_mismatch", f"topic {shown!r} was published from {peer}, not the pod"
                )
        return pod

    def _on_message(self, pod: str, msg: KVMessage, *, may_replay: bool = True) -> None:
        """Apply a live message in order; a gap is repaired from the pod's replay unless this
        message already waited out one (`may_replay` False), which could not fill the gap."""
        state = self._pods.setdefault(pod, _PodState())
        if state.replaying:
            if len(state.buffered) >= MAX_BUFFERED:
                # Dropped, not lost: after the replay this shows as a gap and is replayed.
                state.overflowed = True
                raise _Dropped("replay_buffer_full", f"{pod}: {MAX_BUFFERED} messages wait")
            state.buffered.append(msg)
            return
        last = state.last_seq
        if last is None:
            # First sight of this pod: what came before this batch is only in its replay,
            # and must be applied first (a later batch may remove what an earlier stored).
            if may_replay and msg.seq > 0 and self._replay_endpoint(pod, state):
                state.buffered.append(msg)
                self._start_replay(pod, 0)
            else:
                self._apply(pod, msg)
            return
        if msg.seq == last + 1:
            self._apply(pod, msg)
        elif msg.seq > last + 1:
            self.counts["gaps"] += 1
            if may_replay and self._replay_endpoint(pod, state):
                state.buffered.append(msg)
                self._start_replay(pod, last + 1)
            else:
                self._apply(pod, msg)  # nothing to repair with: carry on from here
        else:
            # seq went backwards: the engine restarted and its old blocks are gone.
            self.counts["restarts"] += 1
            self._restarts.note(
                pod, "restart", f"seq went back ({msg.seq} after {last}): clearing its entries"
            )
            self.sink.clear_pod(pod)
            state.last_seq = None
            if msg.seq > 0 and self._replay_endpoint(pod, state):
                state.buffered.append(msg)
                self._start_replay(pod, 0)
            else:
                self._apply(pod, msg)

    def _apply(self, pod: str, msg: KVMessage) -> None:
        state = self._pods.setdefault(pod, _PodState())
        state.model = self._model_of(pod, msg.topic)
        self._apply_batch(pod, state.model, msg.batch)
        state.last_seq = msg.seq

    def _apply_batch(self, pod: str, model: str, batch: EventBatch) -> None:
        rejected = self.sink.apply_events(pod, model, batch.events)
        self.counts["events"] += len(batch.events) - rejected
        if rejected:
            self.counts["rejected_by_index"] += rejected

    def _model_of(self, pod: str, topic: str) -> str:
        """The model a batch's blocks belong to: from a `kv@pod@model` topic, else (per-pod
        mode) what the pod serves."""
        try:
            return parse_topic(topic)[1]
        except KVEventDecodeError as exc:
            state = self._pods.get(pod)
            if state is None or state.socket is None:
                raise _Dropped("malformed", str(exc)) from None
            model = self.model_for(pod)
            if not model:
                raise _Dropped(
                    "no_model",
                    f"topic {topic!r} names no model and the model {pod} serves is not known yet",
                ) from None
            return model

    # ---- replay ----------------------------------------------------------------------

    def _replay_endpoint(self, pod: str, state: _PodState) -> str | None:
        if state.replay_endpoint is None:
            state.replay_endpoint = self.replay_endpoint_for(pod)
        return state.replay_endpoint

    def _start_replay(self, pod: str, start: int) -> None:
        state = self._pods[pod]
        if state.replaying or self._closed:
            return
        state.replaying = True
        self.counts["replays"] += 1
        self._spawn(self._replay(pod, state, start))

    async def _replay(self, pod: str, state: _PodState, start: int) -> None:
        """Fetch batches >= start from the pod's ROUTER, then drain what arrived meanwhile."""
        dealer = self._ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
        dealer.setsockopt(zmq.IPV6, 1)
        got = 0
        try:
            assert state.replay_endpoint is not None
            dealer.connect(state.replay_endpoint)
            await dealer.send_multipart([b"", start.to_bytes(8, "big")])
            deadline = time.monotonic() + REPLAY_TOTAL_S
            while time.monotonic() < deadline and self._pods.get(pod) is state:
                if not await dealer.poll(int(REPLAY_IDLE_S * 1000)):
                    self.counts["replay_timeouts"] += 1
                    log.warning("replay from %s went quiet after %d batches", pod, got)
                    break
                frames = await dealer.recv_multipart(copy=False)
                try:
                    msg = decode_replay_frames(frames, tokens=self.decode_tokens)
                    if msg is None:
                        break  # the end marker
                    got += self._apply_replayed(pod, state, msg)
                except _Dropped as d:
                    self._refuse(d.reason, f"replay: {d}", pod)
                except KVEventDecodeError as exc:
                    self._refuse("malformed", f"replay: {exc}", pod)
                except Exception as exc:  # a bug must cost this message, not the replay
                    self._refuse("error", f"replay: handling failed: {exc!r}", pod)
        except (zmq.ZMQError, OSError) as exc:
            self.counts["replay_errors"] += 1
            log.warning("replay from %s failed: %s", pod, exc)
        finally:
            dealer.close(0)
            self.counts["replayed_batches"] += got
            state.replaying = False
            buffered, state.buffered = state.buffered, []
            overflowed, state.overflowed = state.overflowed, False
            if self._pods.get(pod) is state:  # not if the pod left meanwhile
                self._drain(pod, state, buffered, may_replay=overflowed)

    def _apply_replayed(self, pod: str, state: _PodState, msg: KVMessage) -> int:
        """Apply one replayed batch unless already applied; 1 if applied."""
        expected = 0 if state.last_seq is None else state.last_seq + 1
        if msg.seq < expected:
            return 0
        # Older replays carry no topic: the live one named the model.
        model = self._model_of(pod, msg.topic) if msg.topic or not state.model else state.model
        self._apply_batch(pod, model, msg.batch)
        state.last_seq = msg.seq
        return 1

    def _drain(
        self, pod: str, state: _PodState, buffered: list[KVMessage], *, may_replay: bool
    ) -> None:
        """The live messages that arrived during a replay, in order, each on its own."""
        for msg in sorted(buffered, key=lambda m: m.seq):
            if state.last_seq is not None and msg.seq <= state.last_seq:
                continue
            try:
                # A gap left after the replay is one the pod could not fill (it no longer
                # holds, or never had, those batches): another replay would end the same way
                # and start another, for ever. Only messages dropped here while it ran
                # (overflowed) are worth a second replay.
                self._on_message(pod, msg, may_replay=may_replay)
            except _Dropped as d:
                self._refuse(d.reason, str(d), pod)
            except Exception as exc:
                self._refuse("error", f"handling a buffered message failed: {exc!r}", pod)
