"""The picker's shared Redis clients for rate limits, one per address, made on first use.

Apart from redis_backend so that a picker whose routes never name Redis does not import
redis-py at start (a third of a second of CPU, paid by every picker process)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from redis.asyncio import Redis

DEFAULT_TIMEOUT = 0.25  # seconds for one Redis call, connecting included


class RedisClients:
    """One client per Redis address, shared by the routes that name it."""

    def __init__(self, *, timeout: float = DEFAULT_TIMEOUT, max_connections: int = 32) -> None:
        self.timeout = timeout
        self.max_connections = max_connections
        self._clients: dict[str, Redis] = {}

    def get(self, address: str) -> Redis:
        client = self._clients.get(address)
        if client is None:
            from infergw.epp.ratelimit.redis_backend import redis_client

            client = self._clients[address] = redis_client(
                address, timeout=self.timeout, max_connections=self.max_connections
            )
        return client

    async def aclose(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aclose()
