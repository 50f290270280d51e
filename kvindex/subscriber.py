"""Receive vLLM KV events over ZMQ and keep an index in step with every pod.

Two modes, as llm-d runs them: **central** (we bind one SUB socket and every pod's PUB
connects to it) and **per-pod** (we connect a SUB to each pod's PUB as pods appear, so several
picker replicas can each build an index). Per pod we track the sequence number: the next one
is applied; a gap asks the pod's replay (ROUTER) socket for what was missed; a number that
goes backwards means the engine restarted, so the pod's entries are dropped and replayed from
0. Malformed messages are counted and skipped, never fatal.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Protocol

import zmq
import zmq.asyncio

from kvindex.events import (
    AllBlocksCleared,
    EventBatch,
    KVEventDecodeError,
    KVMessage,
    decode_message,
    decode_replay_frames,
    parse_topic,
)

log = logging.getLogger("kvindex.subscriber")

REPLAY_IDLE_S = 2.0  # a replay socket silent this long is given up on
REPLAY_TOTAL_S = 120.0


class EventSink(Protocol):
    def apply(self, pod: str, model: str, event) -> None: ...
    def clear_pod(self, pod: str) -> None: ...


class _PodState:
    __slots__ = ("buffered", "last_seq", "model", "replay_endpoint", "replaying", "socket")

    def __init__(self) -> None:
        self.last_seq: int | None = None
        self.model = ""  # from the live topic; older replays carry no topic
        self.replay_endpoint: str | None = None
        self.replaying = False
        self.buffered: list[KVMessage] = []  # live messages that arrive during a replay
        self.socket: zmq.asyncio.Socket | None = None  # per-pod mode only


class KVEventSubscriber:
    def __init__(
        self,
        sink: EventSink,
        *,
        replay_endpoint_for: Callable[[str], str | None] | None = None,
        model_for: Callable[[str], str | None] | None = None,
    ) -> None:
        self.sink = sink
        self.replay_endpoint_for = replay_endpoint_for or (lambda _pod: None)
        # Per-pod mode only: the model of a pod whose topic does not name it (vLLM's
        # default topic is empty; the socket already says which pod it is).
        self.model_for = model_for or (lambda _pod: None)
        self.counts: Counter[str] = Counter()
        self._ctx = zmq.asyncio.Context()
        self._pods: dict[str, _PodState] = {}
        self._central: zmq.asyncio.Socket | None = None
        self._tasks: set[asyncio.Task] = set()
        self._drop = 0  # test hook: live messages to discard on purpose

    # ---- setup -----------------------------------------------------------------------

    def bind(self, endpoint: str) -> None:
        """Central mode: every pod's PUB connects here."""
        sock = self._ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.SUBSCRIBE, b"kv@")
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.bind(endpoint)
        self._central = sock
        self._spawn(self._receive(sock))

    def connect_pod(self, pod: str, pub_endpoint: str, replay_endpoint: str | None) -> None:
        """Per-pod mode: subscribe to one pod's PUB socket and catch up from its replay."""
        state = self._pods.setdefault(pod, _PodState())
        if state.socket is not None:
            return
        sock = self._ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.SUBSCRIBE, b"")  # every topic: vLLM's default one is empty
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(pub_endpoint)
        state.socket = sock
        state.replay_endpoint = replay_endpoint
        self._spawn(self._receive(sock, pod))
        if replay_endpoint:
            self._start_replay(pod, 0)

    def forget_pod(self, pod: str) -> None:
        """The pod left the pool: its entries go, and so does its socket."""
        state = self._pods.pop(pod, None)
        if state is not None and state.socket is not None:
            state.socket.close(0)
        self.sink.clear_pod(pod)

    def drop_next(self, n: int) -> None:
        """Test hook: discard the next n live messages, as a congested network would."""
        self._drop += n

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for state in self._pods.values():
            if state.socket is not None:
                state.socket.close(0)
        if self._central is not None:
            self._central.close(0)
        self._ctx.term()

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- live path -------------------------------------------------------------------

    async def _receive(self, sock: zmq.asyncio.Socket, from_pod: str | None = None) -> None:
        """Central mode (from_pod None): the topic names the pod. Per pod: the socket does."""
        while True:
            frames = await sock.recv_multipart()
            self.counts["received"] += 1
            if self._drop:
                self._drop -= 1
                self.counts["dropped_by_test_hook"] += 1
                continue
            try:
                msg = decode_message(frames)
                pod = from_pod or parse_topic(msg.topic)[0]
                self._model_of(pod, msg.topic)
            except KVEventDecodeError as exc:
                self.counts["malformed"] += 1
                log.warning("KV event skipped: %s", exc)
                continue
            self._on_message(pod, msg)

    def _on_message(self, pod: str, msg: KVMessage) -> None:
        state = self._pods.setdefault(pod, _PodState())
        if state.replaying:
            state.buffered.append(msg)
            return
        last = state.last_seq
        if last is None:
            # First sight of this pod: what came before this batch is only in its replay,
            # and must be applied first (a later batch may remove what an earlier stored).
            if msg.seq > 0 and self._replay_endpoint(pod, state):
                state.buffered.append(msg)
                self._start_replay(pod, 0)
            else:
                self._apply(pod, msg)
            return
        if msg.seq == last + 1:
            self._apply(pod, msg)
        elif msg.seq > last + 1:
            self.counts["gaps"] += 1
            if self._replay_endpoint(pod, state):
                state.buffered.append(msg)
                self._start_replay(pod, last + 1)
            else:
                self._apply(pod, msg)  # nothing to repair with: carry on from here
        else:
            # seq went backwards: the engine restarted and its old blocks are gone.
            self.counts["restarts"] += 1
            log.info(
                "KV events from %s restarted (seq %d after %d): clearing its entries",
                pod,
                msg.seq,
                last,
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
        for event in batch.events:
            try:
                if isinstance(event, AllBlocksCleared):
                    self.sink.clear_pod(pod)
                else:
                    self.sink.apply(pod, model, event)
                self.counts["events"] += 1
            except (ValueError, KeyError) as exc:
                self.counts["rejected_by_index"] += 1
                log.debug("index rejected an event from %s: %s", pod, exc)

    def _model_of(self, pod: str, topic: str) -> str:
        """The model a batch's blocks belong to: from a `kv@pod@model` topic, else (per-pod
        mode) what the pod serves."""
        try:
            return parse_topic(topic)[1]
        except KVEventDecodeError:
            state = self._pods.get(pod)
            if state is None or state.socket is None:
                raise
            model = self.model_for(pod)
            if not model:
                raise KVEventDecodeError(
                    f"topic {topic!r} names no model and the model {pod} serves is not known yet"
                ) from None
            return model

    # ---- replay ----------------------------------------------------------------------

    def _replay_endpoint(self, pod: str, state: _PodState) -> str | None:
        if state.replay_endpoint is None:
            state.replay_endpoint = self.replay_endpoint_for(pod)
        return state.replay_endpoint

    def _start_replay(self, pod: str, start: int) -> None:
        state = self._pods[pod]
        if state.replaying:
            return
        state.replaying = True
        self.counts["replays"] += 1
        self._spawn(self._replay(pod, state, start))

    async def _replay(self, pod: str, state: _PodState, start: int) -> None:
        """Fetch batches >= start from the pod's ROUTER, then drain what arrived meanwhile."""
        dealer = self._ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        got = 0
        try:
            assert state.replay_endpoint is not None
            dealer.connect(state.replay_endpoint)
            await dealer.send_multipart([b"", start.to_bytes(8, "big")])
            deadline = time.monotonic() + REPLAY_TOTAL_S
            while time.monotonic() < deadline:
                if not await dealer.poll(int(REPLAY_IDLE_S * 1000)):
                    self.counts["replay_timeouts"] += 1
                    log.warning("replay from %s went quiet after %d batches", pod, got)
                    break
                try:
                    msg = decode_replay_frames(await dealer.recv_multipart())
                except KVEventDecodeError as exc:
                    self.counts["malformed"] += 1
                    log.warning("replay message from %s skipped: %s", pod, exc)
                    continue
                if msg is None:
                    break  # the end marker
                expected = 0 if state.last_seq is None else state.last_seq + 1
                if msg.seq >= expected:
                    try:  # older replays carry no topic: the live one named the model
                        if msg.topic or not state.model:
                            model = self._model_of(pod, msg.topic)
                        else:
                            model = state.model
                    except KVEventDecodeError as exc:
                        self.counts["malformed"] += 1
                        log.warning("replay message from %s skipped: %s", pod, exc)
                        continue
                    self._apply_batch(pod, model, msg.batch)
                    state.last_seq = msg.seq
                    got += 1
        except (zmq.ZMQError, OSError) as exc:
            self.counts["replay_errors"] += 1
            log.warning("replay from %s failed: %s", pod, exc)
        finally:
            dealer.close(0)
            self.counts["replayed_batches"] += got
            state.replaying = False
            buffered, state.buffered = state.buffered, []
            for msg in sorted(buffered, key=lambda m: m.seq):
                if state.last_seq is None or msg.seq > state.last_seq:
                    self._on_message(pod, msg)
