"""Receiving a simulator's KV events over real ZMQ, as vLLM's central subscriber does."""

from __future__ import annotations

import json
import threading
import time

import zmq

from infergw.kvindex.events import decode_message
from tests.conftest import free_port
from tests.paths import TINY_MODEL

TOPIC = "kv@127.0.0.1:8300@tiny"  # the recorded vLLM's


class Subscriber:
    """A SUB socket bound where the simulator's PUB connects (vLLM's central mode).

    A thread keeps receiving: ZMQ attaches a new connection (and so forwards the subscription
    to the PUB) only while the application is inside a socket call, so an idle SUB would make
    the PUB drop the first messages.
    """

    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"kv@")
        self.monitor = self.sub.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        self.port = free_port()
        self.sub.bind(f"tcp://127.0.0.1:{self.port}")
        self.raw: list[list[bytes]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._stop.is_set():
            if self.sub.poll(20):
                self.raw.append(self.sub.recv_multipart())

    def wait_connected(self, timeout: float = 10.0) -> None:
        if not self.monitor.poll(int(timeout * 1000)):
            raise TimeoutError("the simulator's PUB socket never connected")
        self.monitor.recv_multipart()
        time.sleep(0.2)  # the subscription travels to the PUB after the handshake

    @property
    def messages(self):
        return [decode_message(frames) for frames in self.raw]

    def drain(self, quiet_for: float = 0.5):
        """Wait until no message has arrived for `quiet_for` seconds; return all so far."""
        seen, deadline = -1, time.monotonic() + quiet_for
        while time.monotonic() < deadline or len(self.raw) != seen:
            if len(self.raw) != seen:
                seen, deadline = len(self.raw), time.monotonic() + quiet_for
            time.sleep(0.02)
        return self.messages

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sub.disable_monitor()
        self.monitor.close(0)
        self.sub.close(0)
        self.ctx.term()


def start_tiny(sim_factory, sub: Subscriber, *extra: str, blocks: int = 80):
    """A simulator flagged as the recorded vLLM was, publishing to `sub`: (URL, replay port)."""
    replay_port = free_port()
    cfg = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": f"tcp://127.0.0.1:{sub.port}",
        "replay_endpoint": f"tcp://127.0.0.1:{replay_port}",
        "topic": TOPIC,
    }
    url = sim_factory(
        "--model",
        str(TINY_MODEL),
        "--served-model-name",
        "tiny",
        "--block-size",
        "32",
        "--num-gpu-blocks-override",
        str(blocks),
        "--max-model-len",
        "2048",
        "--kv-events-config",
        json.dumps(cfg),
        "--sim-time-scale",
        "0.1",
        *extra,
    )
    sub.wait_connected()
    return url, replay_port
