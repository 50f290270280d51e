"""Standalone mode's `kubectl apply`: objects from a directory of YAML, watched.

Every document is validated like the admission webhook would (api) before it is
accepted; an invalid one is logged with its file and reason and skipped, and the rest apply.
A Namespace document only lends its labels to that check: a ModelInfer whose pods would get
power over their node is accepted in a namespace labelled
infergate.io/allow-privileged-pods=true only, as the webhook decides in a cluster.
Editing a file applies it again (specs replaced, status kept); removing a document or its
file deletes the object it had created.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import yaml

from infergw.api import forbidden_host_powers, prune_nulls, validate_dict, yaml_files
from infergw.api.meta import Problems
from infergw.api.names import LOCAL_OBJECT_STORE_KIND
from infergw.api.pod import check_pod_template
from infergw.cluster.store import CLUSTER_ONLY, KINDS, NotFound, Obj, Store, kind_of

log = logging.getLogger("controllers.manifests")
# Kinds an example directory holds for the rest of the stack, not for the controllers: the
# picker's configuration, Envoy's SecurityPolicy with the Secrets of its API keys, and the
# local S3 the stack starts for the example (stack/object_store.py).
BESIDE = {
    "EndpointPickerConfig",
    "SecurityPolicy",
    "Secret",
    "Namespace",
    LOCAL_OBJECT_STORE_KIND,
}


def read_objects(directory: Path) -> tuple[list[tuple[str, Obj]], list[str]]:
    """(where, object) for every document of a known kind, and the problems found."""
    objects, problems = [], []
    files = (
        [directory]
        if directory.is_file()
        else sorted(p for p in directory.rglob("*") if p.suffix in (".yaml", ".yml"))
    )
    found: list[tuple[str, object]] = []
    for path in files:
        try:
            docs = yaml_files.safe_load_all(yaml_files.read_text(path))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            problems.append(f"{path}: not readable YAML: {exc}")
            continue
        found += [(f"{path}#{i}", doc) for i, doc in enumerate(docs)]
    namespace_labels = _namespace_labels(doc for _, doc in found)
    for where, doc in found:
        if doc is None or (isinstance(doc, dict) and doc.get("kind") in BESIDE):
            continue
        if (
            not isinstance(doc, dict)
            or doc.get("kind") not in KINDS
            or KINDS[doc["kind"]] in CLUSTER_ONLY
        ):
            kind = doc.get("kind") if isinstance(doc, dict) else doc
            problems.append(f"{where}: kind {kind!r} is not one standalone mode runs")
            continue
        doc = prune_nulls(doc)  # as the API server reads them
        meta = doc.get("metadata")
        if not isinstance(meta, dict) or not isinstance(meta.get("name"), str):
            problems.append(f"{where}: {doc['kind']} without a metadata.name")
            continue
        errors = _problems(doc)
        if not errors and doc["kind"] == "ModelInfer":
            namespace = meta.get("namespace") or "default"
            errors = forbidden_host_powers(doc, namespace_labels.get(namespace, {}))
        if errors:
            problems.append(
                f"{where}: {doc['kind']} {meta['name']} is invalid: {'; '.join(errors)}"
            )
            continue
        meta.setdefault("namespace", "default")
        objects.append((where, doc))
    return objects, problems


def _problems(doc: Obj) -> list[str]:
    """Our kinds as the webhook checks them; a Pod as its template would be (the local
    runtime reads the same fields); Services and Leases as they are."""
    if doc["kind"] == "Pod":
        problems = Problems()
        check_pod_template(problems, "", doc, required=True)
        return [m.removeprefix(".") for m in problems.messages]
    if doc["kind"] in ("Service", "Lease"):
        return []
    return validate_dict(doc)


def _namespace_labels(docs) -> dict[str, dict[str, str]]:
    """The labels of the Namespace documents, by name."""
    out = {}
    for doc in docs:
        if isinstance(doc, dict) and doc.get("kind") == "Namespace":
            meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
            labels = meta.get("labels")
            if isinstance(meta.get("name"), str) and isinstance(labels, dict):
                out[meta["name"]] = {str(k): str(v) for k, v in labels.items()}
    return out


class ManifestDirectory:
    def __init__(self, store: Store, path: Path, *, interval: float = 1.0) -> None:
        self.store = store
        self.path = path
        self.interval = interval
        self.applied: dict[tuple[str, str, str], Obj] = {}  # (kind, ns, name) → last applied
        self.problems: list[str] = []
        self._stamp: tuple | None = None
        self._task: asyncio.Task | None = None

    async def apply_once(self) -> None:
        objects, self.problems = read_objects(self.path)
        for p in self.problems:
            log.error("%s", p)
        seen = set()
        for where, obj in objects:
            key = (obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"])
            seen.add(key)
            if self.applied.get(key) == obj:
                continue
            await self._apply(obj, where)
            self.applied[key] = obj
        for key in set(self.applied) - seen:
            kind, ns, name = key
            try:
                await self.store.delete(KINDS[kind], ns, name)
                log.info("deleted %s %s/%s: gone from %s", kind, ns, name, self.path)
            except NotFound:
                pass
            del self.applied[key]

    async def _apply(self, obj: Obj, where: str) -> None:
        kind = kind_of(obj)
        m = obj["metadata"]
        have = await self.store.get(kind, m["namespace"], m["name"])
        if have is None:
            await self.store.create(obj)
            log.info("created %s %s/%s from %s", kind.kind, m["namespace"], m["name"], where)
            return
        have["spec"] = obj.get("spec")
        have["metadata"]["labels"] = m.get("labels") or {}
        have["metadata"]["annotations"] = m.get("annotations") or {}
        await self.store.update(have)
        log.info("updated %s %s/%s from %s", kind.kind, m["namespace"], m["name"], where)

    def _fingerprint(self) -> tuple:
        files = [self.path] if self.path.is_file() else sorted(self.path.rglob("*.y*ml"))
        return tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files if f.exists())

    async def start(self) -> None:
        await self.apply_once()
        self._stamp = self._fingerprint()
        self._task = asyncio.create_task(self._watch())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            stamp = self._fingerprint()
            if stamp != self._stamp:
                self._stamp = stamp
                try:
                    await self.apply_once()
                except Exception:  # one bad edit must not stop the watch
                    log.exception("applying %s failed", self.path)
