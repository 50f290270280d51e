"""An in-process Kubernetes API emulator: enough of kube-apiserver for the official client.

Objects live in memory, keyed by (group, version, plural, namespace, name); every write takes
the next resourceVersion from one global counter and appends an event to a bounded history that
watches replay from. Core resources are served under /api/v1, anything else under
/apis/{group}/{version}, namespaced or cluster-wide. Like a resource with a status subresource,
writes to the object keep its status and writes to /status change only the status. Every object
also has a scale subresource (autoscaling/v1 Scale over .spec.replicas, .status.replicas and
.status.labelSelector, as a CRD declares it). DELETE honours metadata.finalizers (the object only
gets a deletionTimestamp until an update empties them), and removing an object removes its
dependents (ownerReferences to its uid), as the garbage collector's background deletion does.

    async with KubeAPIEmulator() as api: ...          # on the running event loop
    with KubeAPIEmulator().threaded() as api: ...     # own loop in a thread, for sync code
    client = kubernetes.client.ApiClient(api.client_configuration())
"""

from __future__ import annotations

import asyncio
import copy
import json
import socket
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import kubernetes.client
import yaml
from aiohttp import web

from infergw.controllers.memory_store import scale_of

Key = tuple[str, str, str, str, str]  # group, version, plural, namespace, name
GVP = tuple[str, str, str]  # group, version, plural
Obj = dict[str, Any]
WATCH_TIMEOUT = 1800  # what kube-apiserver's --min-request-timeout defaults to
IRREGULAR_PLURALS = {"Endpoints": "endpoints"}
# fmt: off
VERSION_INFO = {  # the client's model wants every field
    "major": "1", "minor": "33", "gitVersion": "v1.33.0-emulator", "gitCommit": "0" * 40,
    "gitTreeState": "clean", "buildDate": "2025-01-01T00:00:00Z", "goVersion": "go1.24",
    "compiler": "gc", "platform": "linux/amd64",
}
# fmt: on


class APIError(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.status = code, status_object(code, reason, message)


def status_object(code: int, reason: str, message: str) -> Obj:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def plural_of(kind: str) -> str:
    if kind in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[kind]
    low = kind.lower()
    if low.endswith("y") and low[-2:-1] not in "aeiou":
        return low[:-1] + "ies"
    return low + ("es" if low.endswith("s") else "s")


def split_api_version(api_version: str) -> tuple[str, str]:
    group, _, version = api_version.rpartition("/")
    return group, version


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch; strategic merge patches are treated the same way."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def selector(text: str | None, field: bool = False) -> Callable[[Obj], bool]:
    """labelSelector / fieldSelector with =, == and != terms (fields: metadata.name/namespace)."""
    terms = []
    for term in filter(None, (t.strip() for t in (text or "").split(","))):
        neg = "!=" in term
        key, sep, value = term.replace("!=", "=").replace("==", "=").partition("=")
        if not sep or not key.strip():
            raise APIError(400, "BadRequest", f"unsupported selector term {term!r}")
        if field and key.strip() not in ("metadata.name", "metadata.namespace"):
            raise APIError(400, "BadRequest", f"field label not supported: {key.strip()}")
        terms.append((key.strip(), value.strip(), neg))

    def get(obj: Obj, key: str) -> str | None:
        meta = obj.get("metadata") or {}
        if field:
            return meta.get(key.split(".", 1)[1]) or ""
        return (meta.get("labels") or {}).get(key)

    return lambda obj: all((get(obj, k) == v) != neg for k, v, neg in terms)


def query_matcher(query: Mapping[str, str], ns: str) -> Callable[[Obj], bool]:
    labels = selector(query.get("labelSelector"))
    fields = selector(query.get("fieldSelector"), field=True)
    return lambda o: (not ns or o["metadata"].get("namespace") == ns) and labels(o) and fields(o)


class KubeAPIEmulator:
    def __init__(self, history: int = 1000) -> None:
        self._objects: dict[Key, Obj] = {}
        # (resourceVersion, key, type, object, previous object) per write; watches replay it.
        self._history: deque[tuple[int, Key, str, Obj, Obj | None]] = deque()
        self._history_size = history
        # Versions start at 1, the empty store: "0" keeps its API meaning, "any version".
        self._rv = 1
        self._floor = 1  # a watch from a resourceVersion below this gets 410 Gone
        self._epoch = 0  # bumped by expire_history(): open watches get 410 too
        self.open_watches = 0  # lets tests wait until a client is watching
        self._kinds: dict[tuple[str, str], str] = {("", "pods"): "Pod"}
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed: asyncio.Event | None = None
        self._closing = False
        self._runner: web.AppRunner | None = None
        self.port = 0

    # ---- lifecycle ------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client_configuration(self) -> kubernetes.client.Configuration:
        cfg = kubernetes.client.Configuration()
        cfg.host = self.url
        return cfg

    def write_kubeconfig(self, path: Path) -> Path:
        """A kubeconfig naming this emulator, for code that finds the API by $KUBECONFIG."""
        cluster = {"name": "emu", "cluster": {"server": self.url}}
        context = {"name": "emu", "context": {"cluster": "emu", "user": "me"}}
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [cluster],
            "users": [{"name": "me", "user": {"token": "test"}}],
            "contexts": [context],
            "current-context": "emu",
        }
        path.write_text(yaml.safe_dump(config))
        return path

    async def start(self) -> KubeAPIEmulator:
        self._loop, self._changed = asyncio.get_running_loop(), asyncio.Event()
        self._closing = False
        app = web.Application()
        for prefix in ("/api/{version}", "/apis/{group}/{version}"):
            for scope in ("/namespaces/{namespace}/{plural}", "/{plural}"):
                for tail in ("", "/{name}", "/{name}/{sub}"):
                    app.router.add_route("*", prefix + scope + tail, self._handle)
        for path in ("/api", "/apis", "/version"):  # the client asks for "/api/" and so on
            app.router.add_get(path, self._discovery)
            app.router.add_get(path + "/", self._discovery)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self._runner = web.AppRunner(app, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.SockSite(self._runner, sock).start()
        return self

    async def stop(self) -> None:
        self._closing = True  # open watches see this and end their streams
        self._wake()
        if self._runner:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> KubeAPIEmulator:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @contextmanager
    def threaded(self) -> Iterator[KubeAPIEmulator]:
        """Serve from a background thread with its own event loop (the official client blocks)."""
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="kubeapi", daemon=True)
        thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self.start(), loop).result(10)
            yield self
        finally:
            asyncio.run_coroutine_threadsafe(self.stop(), loop).result(10)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            loop.close()

    # ---- helpers for tests (thread-safe) --------------------------------------------------

    def put(self, obj: Obj, *, plural: str | None = None, cluster_scoped: bool = False) -> Obj:
        """Create or replace an object as given (status included), bypassing all checks."""
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        ns = "" if cluster_scoped else meta.setdefault("namespace", "default")
        group, version = split_api_version(obj["apiVersion"])
        key = (group, version, plural or plural_of(obj["kind"]), ns, meta["name"])
        with self._lock:
            return copy.deepcopy(self._write(key, obj))

    def get(self, api_version: str, kind: str, name: str, namespace: str = "default") -> Obj | None:
        with self._lock:
            obj = self._objects.get(
                (*split_api_version(api_version), plural_of(kind), namespace, name)
            )
            return copy.deepcopy(obj)

    def delete(self, api_version: str, kind: str, name: str, namespace: str = "default") -> bool:
        key = (*split_api_version(api_version), plural_of(kind), namespace, name)
        with self._lock:
            return self._remove(key) is not None

    def expire_history(self) -> None:
        """Forget all events, as if compacted: open watches end with an ERROR 410 event and a
        new watch from any older resourceVersion gets one too (the current one still works)."""
        with self._lock:
            self._history.clear()
            self._floor = self._rv
            self._epoch += 1
        self._wake()

    @property
    def resource_version(self) -> str:
        return str(self._rv)

    # ---- storage (call with the lock held) ------------------------------------------------

    def _record(self, key: Key, kind: str, obj: Obj, prev: Obj | None) -> None:
        self._history.append((self._rv, key, kind, copy.deepcopy(obj), prev))
        while len(self._history) > self._history_size:
            self._floor = self._history.popleft()[0]
        self._wake()

    def _write(self, key: Key, obj: Obj, prev: Obj | None = None) -> Obj:
        prev = prev or self._objects.get(key)
        self._rv += 1
        meta = obj.setdefault("metadata", {})
        meta.update(name=key[4], resourceVersion=str(self._rv))
        if key[3]:
            meta["namespace"] = key[3]
        if prev is None:
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", now_rfc3339())
            meta.setdefault("generation", 1)
        else:
            for f in ("uid", "creationTimestamp", "generation"):
                meta[f] = prev["metadata"].get(f)
            if obj.get("spec") != prev.get("spec"):
                meta["generation"] = (meta["generation"] or 0) + 1
        if obj.get("kind"):
            self._kinds.setdefault((key[0], key[2]), obj["kind"])
        self._objects[key] = obj
        self._record(key, "MODIFIED" if prev else "ADDED", obj, prev)
        return obj

    def _remove(self, key: Key) -> Obj | None:
        obj = self._objects.pop(key, None)
        if obj is not None:
            self._rv += 1
            obj = copy.deepcopy(obj)
            obj["metadata"]["resourceVersion"] = str(self._rv)
            self._record(key, "DELETED", obj, None)
            self._collect_dependents(obj["metadata"].get("uid"))
        return obj

    def _delete(self, key: Key) -> Obj:
        """DELETE: an object with finalizers only gets a deletionTimestamp (an update that
        empties them removes it); one without is removed at once."""
        current = self._objects[key]
        meta = current["metadata"]
        if not meta.get("finalizers"):
            return self._remove(key) or current
        if meta.get("deletionTimestamp"):
            return current
        new = copy.deepcopy(current)
        new["metadata"].update(deletionTimestamp=now_rfc3339(), deletionGracePeriodSeconds=0)
        return self._write(key, new, current)

    def _collect_dependents(self, uid: str | None) -> None:
        """Background cascading deletion: an object none of whose owners is left is deleted
        (through _delete, so its finalizers hold it), and its dependents after it."""
        for key, obj in list(self._objects.items()):
            refs = obj["metadata"].get("ownerReferences") or []
            if key not in self._objects or not any(r.get("uid") == uid for r in refs):
                continue
            live = {o["metadata"].get("uid") for o in self._objects.values()}
            if not any(r.get("uid") in live for r in refs):
                self._delete(key)

    def _wake(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wake_on_loop)

    def _wake_on_loop(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = asyncio.Event()

    # ---- HTTP ----------------------------------------------------------------------------

    async def _discovery(self, request: web.Request) -> web.Response:
        if request.path.startswith("/version"):
            return web.json_response(VERSION_INFO)
        if request.path.rstrip("/") == "/api":
            address = {"clientCIDR": "0.0.0.0/0", "serverAddress": f"127.0.0.1:{self.port}"}
            return web.json_response(
                {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [address]}
            )
        with self._lock:
            served = sorted({(k[0], k[1]) for k in self._objects if k[0]})
        groups = []
        for g, v in served:
            gv = {"groupVersion": f"{g}/{v}", "version": v}
            groups.append({"name": g, "versions": [gv], "preferredVersion": gv})
        return web.json_response({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        m = request.match_info
        group, version, plural = m.get("group", ""), m["version"], m["plural"]
        ns, name, sub, method = m.get("namespace", ""), m.get("name"), m.get("sub"), request.method
        try:
            if sub not in (None, "status", "scale"):
                raise APIError(404, "NotFound", f"the server could not find {request.path}")
            if name is None and method == "GET":
                match = query_matcher(request.query, ns)
                if request.query.get("watch") in ("true", "1"):
                    return await self._watch(request, (group, version, plural), match)
                return web.json_response(self._list((group, version, plural), match))
            body = await request.json() if method in ("POST", "PUT", "PATCH") else None
            if method in ("PUT", "PATCH") and not isinstance(body, dict):  # e.g. a JSON patch
                raise APIError(415, "UnsupportedMediaType", "only merge patches are supported")
            with self._lock:
                if name is None and method == "POST":
                    return web.json_response(
                        self._create(group, version, plural, ns, body), status=201
                    )
                key = (group, version, plural, ns, name or "")
                current = self._objects.get(key)
                if current is None:
                    raise APIError(404, "NotFound", f'{plural} "{name}" not found')
                if method == "GET":
                    return web.json_response(scale_of(current) if sub == "scale" else current)
                if method == "DELETE" and sub is None:
                    return web.json_response(self._delete(key))
                if method not in ("PUT", "PATCH"):
                    raise APIError(405, "MethodNotAllowed", f"{method} is not supported here")
                if sub == "scale":
                    return web.json_response(self._update_scale(key, current, body, method))
                return web.json_response(self._update(key, current, body, method, sub))
        except APIError as exc:
            return web.json_response(exc.status, status=exc.code)
        except json.JSONDecodeError as exc:
            return web.json_response(status_object(400, "BadRequest", str(exc)), status=400)

    def _create(self, group: str, version: str, plural: str, ns: str, body: Any) -> Obj:
        if not isinstance(body, dict):
            raise APIError(400, "BadRequest", "the body must be an object")
        meta = body.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        if not meta.get("name"):
            raise APIError(400, "BadRequest", "metadata.name is required")
        key = (group, version, plural, ns, meta["name"])
        if key in self._objects:
            raise APIError(409, "AlreadyExists", f'{plural} "{meta["name"]}" already exists')
        for f in ("uid", "resourceVersion", "generation", "creationTimestamp"):
            meta.pop(f, None)
        body.setdefault("apiVersion", f"{group}/{version}" if group else version)
        body.setdefault("kind", self._kinds.get((group, plural), ""))
        return self._write(key, body)

    @staticmethod
    def _check_version(key: Key, current: Obj, body: Obj) -> None:
        want_rv = (body.get("metadata") or {}).get("resourceVersion")
        if want_rv and want_rv != current["metadata"]["resourceVersion"]:
            raise APIError(
                409, "Conflict", f'Operation cannot be fulfilled on {key[2]} "{key[4]}": '
                "the object has been modified; please apply your changes to the latest version"
            )  # fmt: skip

    def _update(self, key: Key, current: Obj, body: Obj, method: str, sub: str | None) -> Obj:
        new = merge_patch(current, body) if method == "PATCH" else copy.deepcopy(body)
        self._check_version(key, current, body)
        if sub == "status":  # only the status changes
            new = {**copy.deepcopy(current), "status": new.get("status")}
        elif "status" in current:
            new["status"] = copy.deepcopy(current["status"])
        else:
            new.pop("status", None)
        meta = new.setdefault("metadata", {})
        for f in ("deletionTimestamp", "deletionGracePeriodSeconds"):  # only DELETE sets them
            if f in current["metadata"]:
                meta[f] = current["metadata"][f]
            else:
                meta.pop(f, None)
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            return self._remove(key) or current  # the last finalizer is gone
        return self._write(key, new, current)

    def _update_scale(self, key: Key, current: Obj, body: Obj, method: str) -> Obj:
        scale = merge_patch(scale_of(current), body) if method == "PATCH" else body
        self._check_version(key, current, body)
        replicas = (scale.get("spec") or {}).get("replicas")
        if type(replicas) is not int or replicas < 0:
            raise APIError(
                422, "Invalid", f'Scale.autoscaling "{key[4]}" is invalid: spec.replicas: '
                f"Invalid value: {json.dumps(replicas)}: must be a non-negative integer"
            )  # fmt: skip
        new = copy.deepcopy(current)
        new["spec"] = {**(new.get("spec") or {}), "replicas": replicas}
        return scale_of(self._write(key, new, current))

    def _matching(self, gvp: GVP, match: Callable[[Obj], bool]) -> list[Obj]:
        return [copy.deepcopy(o) for k, o in sorted(self._objects.items())
                if k[:3] == gvp and match(o)]  # fmt: skip

    def _list(self, gvp: GVP, match: Callable[[Obj], bool]) -> Obj:
        group, version, plural = gvp
        with self._lock:
            items, rv = self._matching(gvp, match), str(self._rv)
        return {
            "kind": self._kinds.get((group, plural), "") + "List",
            "apiVersion": f"{group}/{version}" if group else version,
            "metadata": {"resourceVersion": rv},
            "items": items,
        }

    async def _watch(
        self, request: web.Request, gvp: GVP, match: Callable[[Obj], bool]
    ) -> web.StreamResponse:
        timeout = float(request.query.get("timeoutSeconds") or WATCH_TIMEOUT)
        deadline = asyncio.get_running_loop().time() + timeout
        since = request.query.get("resourceVersion") or "0"
        if not since.isdigit():
            raise APIError(400, "BadRequest", f"invalid resourceVersion {since!r}")
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)

        async def send(kind: str, obj: Obj) -> None:
            await resp.write(json.dumps({"type": kind, "object": obj}).encode() + b"\n")

        last, epoch, events = int(since), self._epoch, []
        with self._lock:
            if last == 0:  # no version: synthetic ADDED for what exists, then changes
                last = self._rv
                events = [("ADDED", o) for o in self._matching(gvp, match)]
        self.open_watches += 1
        try:
            while not self._closing:
                changed = self._changed
                with self._lock:
                    if last < self._floor or epoch != self._epoch:
                        message = f"too old resource version: {last} ({self._floor})"
                        events.append(("ERROR", status_object(410, "Expired", message)))
                    else:
                        events += self._events_since(last, gvp, match)
                        last = self._rv
                for kind, obj in events:
                    await send(kind, obj)
                    if kind == "ERROR":
                        return resp
                events = []
                try:
                    await asyncio.wait_for(
                        changed.wait(), deadline - asyncio.get_running_loop().time()
                    )
                except TimeoutError:
                    break
            if request.query.get("allowWatchBookmarks") == "true" and not self._closing:
                kind = self._kinds.get((gvp[0], gvp[2]), "")
                await send("BOOKMARK", {"kind": kind, "metadata": {"resourceVersion": str(last)}})
        finally:
            self.open_watches -= 1
        return resp

    def _events_since(
        self, last: int, gvp: GVP, match: Callable[[Obj], bool]
    ) -> list[tuple[str, Obj]]:
        """Events after `last`; like kube-apiserver, an object entering/leaving a filtered
        watch shows up as ADDED/DELETED."""
        out = []
        for rv, key, kind, obj, prev in self._history:
            if rv <= last or key[:3] != gvp:
                continue
            now, before = match(obj), prev is not None and match(prev)
            if kind == "MODIFIED" and now != before:
                kind = "ADDED" if now else "DELETED"
            if now or (kind == "DELETED" and before):
                out.append((kind, copy.deepcopy(obj)))
        return out
