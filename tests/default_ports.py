"""Whether `infergate up` can take its default ports on this machine (else its tests skip)."""

from __future__ import annotations

import socket

DEFAULT_PORTS = (8080, 9901, 9002, 9003, 9090, 9091, 5557)


def ports_free(ports) -> bool:
    for port in ports:
        with socket.socket() as s:
            # as servers bind: a connection of an earlier run in TIME_WAIT does not count
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True
