"""A fleet of simulator pods for one benchmark point, and what the pods themselves report:
prefix-cache hits and queries, and running requests over time (load imbalance)."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import aiohttp

from infergw.stack.local import LocalStack, StackConfig
from infergw.stack.ports import free_port, free_stack_ports

MAX_PICKERS = 4  # ports for this many; a router sets how many pickers it runs


def new_stack(
    workdir: Path,
    pods: int,
    sim_args: list[str],
    picker_config: Path | None,
    picker_args: list[str] = (),
) -> LocalStack:
    """Pods that each bind their own KV-event PUB (per-pod mode) and replay socket, so any
    router with a KV-event source can subscribe; a picker and Envoy only if asked for."""
    ports = free_stack_ports(pods, per_pod_kv=True, pickers=MAX_PICKERS)
    return LocalStack(
        StackConfig(
            workdir=workdir,
            pods=pods,
            ports=ports,
            pod_ports=[free_port() for _ in range(pods)],
            picker_config=picker_config,
            sim_args=[*sim_args, "--log-level", "warning"],
            picker_args=["--log-level", "warning", *picker_args],
            kv_topic="",  # vLLM's default; vllm-router's KV sources read nothing else
        )
    )


def workdir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"bench-routing-{prefix}-"))


async def _metrics(session: aiohttp.ClientSession, address: str) -> str:
    async with session.get(f"http://{address}/metrics") as resp:
        return await resp.text()


def _sum(text: str, name: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{")
    )


class PodWatch:
    """Samples every pod's running requests while a point runs and reads the cache counters
    at its start and end."""

    def __init__(self, addresses: list[str], interval: float = 0.5) -> None:
        self.addresses = addresses
        self.interval = interval
        self.samples: list[list[float]] = []
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> PodWatch:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop_sampling()
        assert self._session is not None
        await self._session.close()

    async def counters(self) -> tuple[float, float]:
        """(prefix-cache hits, queries) summed over the pods, in tokens."""
        assert self._session is not None
        texts = await asyncio.gather(*(_metrics(self._session, a) for a in self.addresses))
        hits = sum(_sum(t, "vllm:prefix_cache_hits_total") for t in texts)
        queries = sum(_sum(t, "vllm:prefix_cache_queries_total") for t in texts)
        return hits, queries

    def start_sampling(self) -> None:
        self._task = asyncio.create_task(self._sample())

    async def stop_sampling(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _sample(self) -> None:
        assert self._session is not None
        while True:
            try:
                texts = await asyncio.gather(*(_metrics(self._session, a) for a in self.addresses))
                self.samples.append([_sum(t, "vllm:num_requests_running") for t in texts])
            except (TimeoutError, aiohttp.ClientError):
                pass
            await asyncio.sleep(self.interval)

    def imbalance(self) -> float | None:
        """Mean over samples of max/mean running requests (1.0 = perfectly even); samples
        with nothing running are skipped."""
        ratios = [max(s) / (sum(s) / len(s)) for s in self.samples if sum(s) > 0]
        return round(sum(ratios) / len(ratios), 2) if ratios else None
