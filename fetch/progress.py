"""How a download shows where it is: a bar redrawn in place on a terminal, a log line every
LOG_EVERY seconds otherwise (an init container's log), and, if asked, a JSON file rewritten
in place (one rename) that another process can read: the phase, bytes and files done and,
at the end, the entry or the error with its condition reason."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

log = logging.getLogger("fetch.download")

LOG_EVERY = 10.0  # seconds between log lines when not on a terminal
DRAW_EVERY = 0.1  # seconds between redraws of the bar
WRITE_EVERY = 1.0  # seconds between rewrites of the progress file
BAR = 30  # characters
_SIZE = r"\d+(?:\.\d)? (?:B|KiB|MiB|GiB|TiB)"
# line() as written (the bar and the file's name left out): what said() reads back from a log.
_LINE = re.compile(
    rf"\] +(\d{{1,3}})% ({_SIZE})/({_SIZE}) ({_SIZE})/s file (\d{{1,6}})/(\d{{1,6}})"
)
_WAITING = re.compile(r"waiting for .{0,200}, which downloads \S{1,300} \((\d{1,9})s\)")


@dataclass(slots=True)
class Progress:
    source: str
    path: Path | None = None  # the progress file, if any
    out: TextIO = field(default_factory=lambda: sys.stderr)
    tty: bool | None = None  # None: whether `out` is a terminal
    phase: str = "listing"
    total: int = 0
    done: int = 0
    files: int = 0
    files_done: int = 0
    current: str = ""
    _drawn: float = 0.0
    _logged: float = 0.0
    _written: float = 0.0
    _started: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        if self.tty is None:
            self.tty = self.out.isatty()

    def begin(self, total: int, files: int, already: int = 0) -> None:
        self.total, self.files, self.done = total, files, already
        self._set("downloading")
        log.info(
            "%s: %d files, %s (%s already here)", self.source, files, _size(total), _size(already)
        )

    def file(self, name: str) -> None:
        self.current = name

    def advance(self, n: int) -> None:
        self.done += n
        self._tick()

    def file_done(self) -> None:
        self.files_done += 1
        self._tick()

    def waiting(self, holder: str, seconds: float) -> None:
        """Another process downloads the same snapshot: said at once, then every LOG_EVERY."""
        if self.phase != "waiting" or time.monotonic() - self._logged >= LOG_EVERY:
            log.info("waiting for %s, which downloads %s (%.0fs)", holder, self.source, seconds)
            self._logged = time.monotonic()
        self._set("waiting")

    def set_phase(self, phase: str) -> None:
        self._set(phase)

    def finish(self, entry: Path, cached: bool) -> None:
        self._end_line()
        how = "already in the cache" if cached else f"downloaded in {self._elapsed():.1f}s"
        log.info("%s: %s at %s", self.source, how, entry)
        self._set("done", {"entry": str(entry), "cached": cached})

    def fail(self, reason: str, message: str) -> None:
        self._end_line()
        self._set("failed", {"reason": reason, "message": message})

    # ---- output -------------------------------------------------------------------------

    def _set(self, phase: str, extra: dict | None = None) -> None:
        changed = phase != self.phase or extra is not None
        self.phase = phase
        if changed:
            self._write(extra, force=True)

    def _tick(self) -> None:
        now = time.monotonic()
        if self.tty and now - self._drawn >= DRAW_EVERY:
            self._drawn = now
            self.out.write("\r" + self.line())
            self.out.flush()
        elif not self.tty and now - self._logged >= LOG_EVERY:
            self._logged = now
            log.info("%s", self.line())
        self._write()

    def line(self) -> str:
        share = self.done / self.total if self.total else 0.0
        bar = "#" * int(share * BAR)
        rate = self.done / max(self._elapsed(), 1e-3)
        return (
            f"[{bar:<{BAR}}] {share:4.0%} {_size(self.done)}/{_size(self.total)} "
            f"{_size(rate)}/s file {self.files_done}/{self.files} {self.current[-40:]}"
        )

    def _end_line(self) -> None:
        if self.tty and self._drawn:
            self.out.write("\r" + self.line() + "\n")
            self.out.flush()

    def _elapsed(self) -> float:
        return time.monotonic() - self._started

    def _write(self, extra: dict | None = None, force: bool = False) -> None:
        now = time.monotonic()
        if self.path is None or (not force and now - self._written < WRITE_EVERY):
            return
        self._written = now
        state = {
            "source": self.source,
            "phase": self.phase,
            "bytesDone": self.done,
            "bytesTotal": self.total,
            "filesDone": self.files_done,
            "files": self.files,
            **(extra or {}),
        }
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(state))
            os.replace(tmp, self.path)
        except OSError as exc:  # a full disk must not hide the download's own error
            log.warning("progress file %s: %s", self.path, exc)


def said(log_tail: str) -> str | None:
    """Where a download is, from the end of its log (what line() and waiting() write there),
    in words for a status condition; None when the tail says neither. A log is read from a
    pod, so nothing of it but the numbers is repeated."""
    for text in reversed(log_tail.splitlines()):
        if m := _LINE.search(text):
            pct, done, total, rate, files_done, files = m.groups()
            return f"{pct}% ({done} of {total}, {rate}/s), file {files_done} of {files}"
        if m := _WAITING.search(text):
            return f"waiting for another download of the same files ({m.group(1)}s)"
    return None


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
