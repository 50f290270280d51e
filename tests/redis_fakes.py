"""A fake Redis on a real socket, speaking RESP3 as the client expects: HELLO gets its map, the
scripts (EVALSHA, EVAL) the replies under test, every other command +OK. For tests of what our
Redis clients do with replies a real server would never send."""

from __future__ import annotations

import asyncio

SCRIPT_COMMANDS = (b"EVALSHA", b"EVAL")
HELLO_RESP3 = {b"server": b"redis", b"proto": 3}


def resp(value) -> bytes:
    """RESP3 encoding: int → integer, bytes → bulk string, None → null, list → array,
    bool → boolean, float → double, dict → map, (kind, text) → that one-line type as is
    ("+" simple string, "-" error, "(" big number, "_" null)."""
    if isinstance(value, bool):
        return b"#t\r\n" if value else b"#f\r\n"
    if isinstance(value, float):
        return b",%r\r\n" % value
    if isinstance(value, dict):
        return b"%%%d\r\n" % len(value) + b"".join(resp(k) + resp(v) for k, v in value.items())
    if isinstance(value, int):
        return b":%d\r\n" % value
    if isinstance(value, bytes):
        return b"$%d\r\n%s\r\n" % (len(value), value)
    if value is None:
        return b"_\r\n"
    if isinstance(value, list):
        return b"*%d\r\n" % len(value) + b"".join(resp(v) for v in value)
    kind, text = value
    return kind.encode() + text.encode() + b"\r\n"


class FakeRedis:
    """Answers the bucket script with `replies` in turn (the last one repeats)."""

    def __init__(self) -> None:
        self.hello = resp(HELLO_RESP3)
        self.replies: list[bytes] = [resp([1])]
        self.script_calls = 0
        self._server: asyncio.Server | None = None
        self._clients: dict[asyncio.StreamWriter, asyncio.Task] = {}

    @property
    def address(self) -> str:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"{host}:{port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in self._clients:
                writer.close()
            await asyncio.gather(*self._clients.values(), return_exceptions=True)
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients[writer] = task
        try:
            while command := await read_command(reader):
                if command[0].upper() == b"HELLO":
                    writer.write(self.hello)
                elif command[0].upper() in SCRIPT_COMMANDS:
                    i = min(self.script_calls, len(self.replies) - 1)
                    self.script_calls += 1
                    writer.write(self.replies[i])
                else:
                    writer.write(b"+OK\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._clients.pop(writer, None)
            writer.close()


async def read_command(reader: asyncio.StreamReader) -> list[bytes]:
    """One client command (an array of bulk strings); [] at the end of the stream."""
    header = await reader.readline()
    if not header:
        return []
    assert header.startswith(b"*"), header
    parts = []
    for _ in range(int(header[1:])):
        size = int((await reader.readline())[1:])
        parts.append((await reader.readexactly(size + 2))[:-2])
    return parts
