"""Two pickers' KV views over one Redis (`--kv-index-backend redis`): the one that subscribes
writes, the read-only one holds nothing and scores the first one's blocks through the precise
prefix scorer (fetched in its prepare step)."""

from __future__ import annotations

import asyncio
import time

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from infergw.epp.datastore import Datastore, Endpoint
from infergw.epp.kv_events import KVCacheView, KVEventOptions
from infergw.epp.options import parse_options
from infergw.epp.scheduling.plugins.precise_prefix_cache import PrecisePrefixCacheScorer
from tests.conftest import free_port
from tests.kv_recordings import recorded_batches, recorded_lines, request
from tests.paths import TINY_MODEL
from tests.redis_server import redis_server_fixture  # noqa: F401

POD, MODEL = "127.0.0.1:8300", "tiny"


def view(address: str, registry: CollectorRegistry, *, write: bool) -> KVCacheView:
    opts = KVEventOptions(
        bind=f"tcp://127.0.0.1:{free_port()}",
        tokenizers={MODEL: TINY_MODEL},
        backend="redis",
        redis_url=f"redis://{address}",
        redis_write=write,
        redis_timeout=0.5,
    )
    v = KVCacheView(Datastore(), opts, registry)
    registry.register(v)
    return v


async def test_a_read_only_picker_scores_the_blocks_another_picker_wrote(redis_server):
    writes, reads = CollectorRegistry(), CollectorRegistry()
    writer = view(redis_server.address, writes, write=True)
    reader = view(redis_server.address, reads, write=False)
    assert writer.subscribes and not reader.subscribes
    writer.start()
    reader.start()  # binds nothing, starts no writer
    scorer = PrecisePrefixCacheScorer("precise", {}, kv=reader.cache)
    row = recorded_lines("requests.jsonl")[0]
    endpoints = [Endpoint(name=a, pod=a, address=a) for a in (POD, "127.0.0.1:8301")]

    async def score() -> list[float]:
        ctx = request(row["path"], row["body"])
        await scorer.prepare(ctx)
        return scorer.score(ctx, endpoints)

    try:
        assert await score() == [0.0, 0.0]
        for ev in recorded_batches()[0].events:  # the first completion's blocks
            writer.translator.apply(POD, MODEL, ev)
        scores: list[float] = []

        async def landed() -> bool:
            scores[:] = await score()
            return scores[0] > 0.9

        await until_async(landed, "the writer's periodic flush reaches the reader")
        assert scores[1] == 0.0
        assert reader.translator.stats()["entries"] == 0  # the reader holds no index
        text = generate_latest(reads).decode()
        assert 'infergate_kvindex_redis_lookups_total{result="ok"}' in text
        assert "infergate_kvindex_redis_written_total" in generate_latest(writes).decode()
    finally:
        await writer.close()
        await reader.close()


async def until_async(check, what: str, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, f"timed out: {what}"
        await asyncio.sleep(0.05)


BASE = ["--pool-name", "pool"]


def test_the_redis_backend_needs_an_address_and_takes_its_flags(capsys):
    with pytest.raises(SystemExit):
        parse_options([*BASE, "--kv-index-backend", "redis"])
    assert "needs --kv-index-redis-url" in capsys.readouterr().err
    opts = parse_options(
        [
            *BASE,
            "--kv-index-backend",
            "redis",
            "--kv-index-redis-url",
            "redis://127.0.0.1:6379",
            "--no-kv-index-redis-write",
            "--kv-index-redis-timeout",
            "20ms",
        ]
    )
    assert opts.kv_index_backend == "redis"
    assert opts.kv_index_redis_url == "redis://127.0.0.1:6379"
    assert not opts.kv_index_redis_write
    assert opts.kv_index_redis_timeout == pytest.approx(0.02)
    assert parse_options(BASE).kv_index_backend == "memory"
