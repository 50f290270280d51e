"""Loopback addresses claimed by the standalone runtimes of one machine.

The runtime gives each pod its own loopback address and checks that the pod's ports are free
there, but a real engine binds its port only after loading its model (a minute or more).
Meanwhile another runtime on the machine (a second `infergate up`, a test's stack) saw the
same port free, took the same address, and its pod's server then answered the first pod's
readiness probe: a vLLM pod reported ready while vLLM was still loading, and later failed to
bind. So a runtime claims an address with an exclusive lock on a file named after it, held as
long as the address is its own; the kernel drops the lock when the process dies, so a killed
runtime leaves no claim behind.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from pathlib import Path

# One directory per machine (and user): every runtime must look in the same one.
DEFAULT_DIR = Path(tempfile.gettempdir()) / f"infergate-pod-addresses-{os.getuid()}"


class AddressLocks:
    def __init__(self, directory: Path = DEFAULT_DIR) -> None:
        self.directory = directory
        self._held: dict[str, int] = {}  # address -> the locked file's descriptor

    def claim(self, address: str) -> bool:
        """Whether `address` is now this claimant's: already, or newly locked; False when
        another runtime holds it."""
        if address in self._held:
            return True
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.directory / f"{address}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._held[address] = fd
        return True

    def release(self, address: str) -> None:
        fd = self._held.pop(address, None)
        if fd is not None:
            os.close(fd)  # closing the descriptor drops its lock

    def release_all(self) -> None:
        for address in list(self._held):
            self.release(address)
