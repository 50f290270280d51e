"""API objects from YAML files (multi-document, `kind: List` too; one or more files or a
directory), read again when a file changes: the pool files of the local stack, read by the
picker's file provider and the decode sidecar's allowlist.

Every object is checked where it enters (a map with a kind and typed metadata; a Pod, the
fields membership reads), so a bad file is an error naming the object, never a crash later.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import yaml

from infergw.api import yaml_files
from infergw.api.meta import ObjectMeta
from infergw.cluster.pool import pod_problem

Obj = dict[str, Any]


class ObjectFileError(ValueError):
    """Files whose YAML or objects cannot be used."""


class UnreadableFileError(ObjectFileError):
    """A file that vanished, cannot be read, or is no regular file of bounded size."""


def yaml_paths(paths: list[Path]) -> list[Path]:
    """The files themselves, and the .yaml/.yml files of each directory, by name."""
    out = []
    for p in paths:
        if p.is_dir():
            out.extend(sorted(f for f in p.iterdir() if f.suffix in (".yaml", ".yml")))
        else:
            out.append(p)
    return out


def load_objects(paths: list[Path]) -> list[Obj]:
    objects = []
    for f in yaml_paths(paths):
        try:
            docs = yaml_files.safe_load_all(yaml_files.read_text(f))
        except OSError as exc:
            raise UnreadableFileError(f"{f}: {exc}") from exc
        except (UnicodeDecodeError, yaml.YAMLError) as exc:
            raise ObjectFileError(f"{f}: {exc}") from exc
        for i, doc in enumerate(docs):
            if doc is None:
                continue
            items = (
                doc.get("items") if isinstance(doc, dict) and doc.get("kind") == "List" else [doc]
            )
            if not isinstance(items, list):
                raise ObjectFileError(f"{f}: document {i}: a List's items must be a list")
            for obj in items:
                _check_object(obj, f"{f}: document {i}")
            objects.extend(items)
    return objects


def _check_object(obj: Any, where: str) -> None:
    """The shape every object needs before anyone reads it: a map with a kind and typed
    metadata; a Pod, the fields membership reads."""
    if not isinstance(obj, dict) or not isinstance(obj.get("kind"), str):
        raise ObjectFileError(f"{where} is not a Kubernetes object")
    try:
        msgspec.convert(obj.get("metadata") or {}, ObjectMeta)
    except msgspec.ValidationError as exc:
        raise ObjectFileError(f"{where} ({obj['kind']}): metadata: {exc}") from None
    if obj["kind"] == "Pod" and (problem := pod_problem(obj)) is not None:
        raise ObjectFileError(f"{where} (Pod): {problem}")


class WatchedFiles:
    """Objects from files, handed to `use` at load() and again whenever a file changes (polled
    every `poll_interval`: inotify does not see every volume). A load that fails, at a poll or a
    refresh(), goes to `failed` and keeps what `use` had: a later good edit applies."""

    def __init__(
        self,
        paths: list[Path],
        use: Callable[[list[Obj]], None],
        failed: Callable[[Exception], None],
        *,
        poll_interval: float = 1.0,
    ) -> None:
        self.paths = paths
        self.use = use
        self.failed = failed
        self.poll_interval = poll_interval
        self._stamp: tuple = ()
        self._task: asyncio.Task | None = None

    def _current_stamp(self) -> tuple:
        """What says a file changed. The inode too: two writes within one tick of the
        filesystem clock can leave mtime and size alike, but a file replaced by rename (as the
        controllers write it) always has another inode than the one it replaced."""
        stamps = []
        for f in yaml_paths(self.paths):
            try:
                st = f.stat()
            except FileNotFoundError:
                continue
            stamps.append((str(f), st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(stamps)

    def load(self) -> None:
        """Read the files now; raises what `use` or reading raises (ObjectFileError, …)."""
        self._stamp = self._current_stamp()
        self.use(load_objects(self.paths))

    def refresh(self) -> None:
        """Read the files again if one changed since the last load."""
        try:
            if self._current_stamp() != self._stamp:
                self.load()
        except Exception as exc:  # whatever it is, the previous objects stay
            self.failed(exc)

    async def start(self) -> None:
        """load(), then poll in the background."""
        self.load()
        self._task = asyncio.create_task(self._poll(), name=f"watch {self.paths[0]}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            self.refresh()
