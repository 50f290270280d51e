"""Whether this machine has the loopback addresses beyond 127.0.0.1 that local pods take.

Standalone mode gives every pod its own loopback address (127.0.0.2, .3, …), as pods have their
own IPs in a cluster. Linux routes all of 127.0.0.0/8 to `lo`; macOS configures 127.0.0.1
alone, so binding 127.0.0.2 fails with EADDRNOTAVAIL. Both the runtime (which takes the
addresses) and `infergate up` (which stops at once, saying how to add them) ask here.
"""

from __future__ import annotations

import errno
import socket

FIRST_POD_ADDRESS = "127.0.0.2"
# How to add them on macOS (they last until the next reboot).
MACOS_ALIASES = "for i in $(seq 2 40); do sudo ifconfig lo0 alias 127.0.0.$i up; done"


def missing_loopback(address: str = FIRST_POD_ADDRESS) -> str | None:
    """Why `address` cannot be bound here, or None when it can (any port: it probes port 0)."""
    with socket.socket() as s:
        try:
            s.bind((address, 0))
        except OSError as exc:
            if exc.errno != errno.EADDRNOTAVAIL:
                return None  # the address exists; a busy port is the caller's concern
            return (
                f"this machine has no loopback address {address} ({exc.strerror}): local pods "
                "each take their own, 127.0.0.2 and up, as pods have their own IPs in a "
                "cluster. Linux has all of 127.0.0.0/8; macOS only 127.0.0.1 — add more with: "
                f"{MACOS_ALIASES}"
            )
    return None
