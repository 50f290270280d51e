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
A GET of a pod's `proxy` subresource (`pods/NAME:PORT/proxy/PATH`) is forwarded over HTTP to
the pod's `status.podIP` and that port, as kube-apiserver's pod proxy does.
A GET of a pod's `log` subresource serves what a test wrote with `write_pod_log`, with the
options and refusals of kube-apiserver (tests/kube_pod_logs.py).

Custom resources exist only where a CRD is installed (ours from crds/ by default, see
tests/kube_crd.py, or a CustomResourceDefinition created through the API, as `kubectl apply`
installs one; anything else outside the built-in groups is 404), with the subresources
that CRD declares, and every write goes through the version's structural schema as on a real
API server (tests/kube_schema.py): unknown fields pruned (the `fieldValidation` query parameter:
Strict refuses them with 400, Warn — the server's default — and Ignore drop them, Warn with a
`Warning` header that `warnings` also records), defaults filled in (on reads too), then
OpenAPI and CEL validation, failures a 422 Invalid Status naming each field in
`details.causes`. Built-in kinds are stored as sent (their schemas are not checked here), but
for the names and labels every kind is checked for and the fields of an `events.k8s.io/v1`
Event (tests/kube_events.py).

    async with KubeAPIEmulator() as api: ...          # on the running event loop
    with KubeAPIEmulator().threaded() as api: ...     # own loop in a thread, for sync code
    client = kubernetes.client.ApiClient(api.client_configuration())
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
import socket
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import kubernetes.client
import yaml
from aiohttp import web
from multidict import CIMultiDict

from tests.kube_crd import (
    BUILTIN_GROUPS,
    DEFAULT_CRDS,
    CustomResource,
    ScalePaths,
    custom_resource,
    load_crds,
)
from tests.kube_events import event_errors, is_event
from tests.kube_pod_logs import LogRefused, served_log
from tests.kube_schema import FieldError, invalid

Key = tuple[str, str, str, str, str]  # group, version, plural, namespace, name
GVP = tuple[str, str, str]  # group, version, plural
Obj = dict[str, Any]
WATCH_TIMEOUT = 1800  # what kube-apiserver's --min-request-timeout defaults to
IRREGULAR_PLURALS = {"Endpoints": "endpoints"}
FIELD_VALIDATION = ("Ignore", "Warn", "Strict")  # "Warn" is kube-apiserver's default
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
NAME_MESSAGE = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or "
    "'.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used "
    "for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
)
# What kube-apiserver's validation says of a Service's name (a DNS-1035 label) and of labels
# (apimachinery's IsValidLabelValue and IsQualifiedName), written out here, not imported:
# the controllers' names (api/object_names.py) are what these check.
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS_1035_MESSAGE = (
    "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an "
    "alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or "
    "'abc-123', regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')"
)
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
LABEL_VALUE_MESSAGE = (
    "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or "
    "'.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or "
    "'my_value',  or '12345', regex used for validation is "
    "'(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')"
)
LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
LABEL_MAX = 63
# Where a built-in kind carries labels besides metadata.labels: a Service's selector, a
# Deployment's (or PodDisruptionBudget's) selector and pod template.
NESTED_LABELS = ("spec.selector", "spec.selector.matchLabels", "spec.template.metadata.labels")
BUILTIN_SCALE = ScalePaths()
CRD_RESOURCE = ("apiextensions.k8s.io", "customresourcedefinitions")
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


def invalid_error(group: str, kind: str, name: str, errors: list[FieldError]) -> APIError:
    """422 Invalid, as apimachinery's errors.NewInvalid builds it."""
    qualified = f"{kind}.{group}" if group else kind
    listed = str(errors[0]) if len(errors) == 1 else f"[{', '.join(map(str, errors))}]"
    exc = APIError(422, "Invalid", f'{qualified} "{name}" is invalid: {listed}')
    details = {"name": name, "group": group, "kind": kind, "causes": [e.cause() for e in errors]}
    exc.status["details"] = {k: v for k, v in details.items() if v != ""}
    return exc


def not_found() -> APIError:
    return APIError(404, "NotFound", "the server could not find the requested resource")


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


def kubeconfig_env(kubeconfig: Path) -> dict[str, str]:
    """The environment of a process outside a pod that finds the API by this kubeconfig (the
    in-cluster config must not apply)."""
    return {"KUBECONFIG": str(kubeconfig), "KUBERNETES_SERVICE_HOST": "", "PYTHONUNBUFFERED": "1"}


class KubeAPIEmulator:
    def __init__(
        self, history: int = 1000, crds: Iterable[Path | dict[str, Any]] | None = None
    ) -> None:
        """`crds`: CRD files (or parsed CRDs) to install; by default ours and the ones tests
        use (tests/kube_crd.py DEFAULT_CRDS). A CEL rule that does not compile raises here."""
        self._crds: dict[tuple[str, str], CustomResource] = {
            (c.group, c.plural): c for c in load_crds(DEFAULT_CRDS if crds is None else crds)
        }
        self.warnings: list[str] = []  # every Warning header sent (dropped unknown fields)
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
        # (namespace, pod, container) → its log, as the kubelet keeps it (write_pod_log)
        self._pod_logs: dict[tuple[str, str, str], bytes] = {}
        self._kinds.update({gp: c.kind for gp, c in self._crds.items()})
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

    def write_kubeconfig(self, path: Path, token: str = "test") -> Path:
        """A kubeconfig naming this emulator, for code that finds the API by $KUBECONFIG; its
        user sends `token` (a ServiceAccount's, where tests/kube_rbac.py authorizes)."""
        cluster = {"name": "emu", "cluster": {"server": self.url}}
        context = {"name": "emu", "context": {"cluster": "emu", "user": "me"}}
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [cluster],
            "users": [{"name": "me", "user": {"token": token}}],
            "contexts": [context],
            "current-context": "emu",
        }
        path.write_text(yaml.safe_dump(config))
        return path

    async def start(self) -> KubeAPIEmulator:
        self._loop, self._changed = asyncio.get_running_loop(), asyncio.Event()
        self._closing = False
        app = web.Application()
        # before the generic routes, which would take "NAME:PORT/proxy" as a name and subresource
        app.router.add_get(
            "/api/v1/namespaces/{namespace}/pods/{target}/proxy/{path:.*}", self._pod_proxy
        )
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
        """Create or replace an object as given (status included), bypassing all checks but
        one: a custom resource needs its CRD."""
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        group, version = split_api_version(obj["apiVersion"])
        crd = self._crd_of_kind(group, obj["kind"])
        if crd is not None:
            plural, cluster_scoped = crd.plural, not crd.namespaced
        elif group not in BUILTIN_GROUPS:
            raise ValueError(f"no CRD installed for {obj['kind']}.{group}")
        ns = "" if cluster_scoped else meta.setdefault("namespace", "default")
        key = self._key(group, version, plural or plural_of(obj["kind"]), ns, meta["name"])
        with self._lock:
            return self._present(self._write(key, obj), version)

    def get(self, api_version: str, kind: str, name: str, namespace: str = "default") -> Obj | None:
        """The object as a client reads it (defaults applied), or None."""
        group, version = split_api_version(api_version)
        with self._lock:
            obj = self._objects.get(self._helper_key(group, version, kind, namespace, name))
            return None if obj is None else self._present(obj, version)

    def write_pod_log(self, namespace: str, pod: str, container: str, text: str) -> None:
        """What a container has logged so far (served by the pod's log subresource)."""
        with self._lock:
            self._pod_logs[namespace, pod, container] = text.encode()

    def list_objects(self, api_version: str, kind: str) -> list[Obj]:
        """Every stored object of `kind`, in all namespaces, as a client reads them."""
        group, version = split_api_version(api_version)
        gvp = self._helper_key(group, version, kind, "", "")[:3]
        with self._lock:
            return self._matching(gvp, version, lambda _: True)

    def delete(self, api_version: str, kind: str, name: str, namespace: str = "default") -> bool:
        group, version = split_api_version(api_version)
        key = self._helper_key(group, version, kind, namespace, name)
        with self._lock:
            return self._remove(key) is not None

    def resource_of(self, group: str, kind: str) -> CustomResource | None:
        """The installed CRD serving `kind` of `group` (its plural and scope), or None."""
        with self._lock:
            return self._crd_of_kind(group, kind)

    def _crd_of_kind(self, group: str, kind: str) -> CustomResource | None:
        return next((c for c in self._crds.values() if (c.group, c.kind) == (group, kind)), None)

    def _helper_key(self, group: str, version: str, kind: str, ns: str, name: str) -> Key:
        crd = self._crd_of_kind(group, kind)
        plural = crd.plural if crd else plural_of(kind)
        return self._key(group, version, plural, ns if crd is None or crd.namespaced else "", name)

    def _key(self, group: str, version: str, plural: str, ns: str, name: str) -> Key:
        """Custom resources are stored once, at the storage version, whatever version a
        client names (conversion None: only apiVersion differs)."""
        crd = self._crds.get((group, plural))
        return (group, crd.storage_version if crd else version, plural, ns, name)

    def _present(self, obj: Obj, version: str) -> Obj:
        """A copy as served at `version`: a custom resource with its defaults applied, as
        kube-apiserver defaults what it reads from storage."""
        out = copy.deepcopy(obj)
        group = split_api_version(out.get("apiVersion", ""))[0]
        crd = self._crd_of_kind(group, out.get("kind", ""))
        if crd is not None and version in crd.schemas:
            out["apiVersion"] = f"{group}/{version}"
            crd.schemas[version].default(out)
        return out

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
            # compared with the old object as read (defaulted), as kube-apiserver compares
            if obj.get("spec") != self._present(prev, key[1]).get("spec"):
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
            served = {(k[0], k[1]) for k in self._objects if k[0]}
        served |= {(c.group, v) for c in self._crds.values() for v in c.schemas}
        groups = []
        for g, v in sorted(served):
            gv = {"groupVersion": f"{g}/{v}", "version": v}
            groups.append({"name": g, "versions": [gv], "preferredVersion": gv})
        return web.json_response({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})

    async def _pod_proxy(self, request: web.Request) -> web.Response:
        """GET pods/NAME[:PORT]/proxy/PATH: the pod's answer, relayed (503 when it has no IP
        or does not answer, as the API server says)."""
        m = request.match_info
        name, _, port = m["target"].partition(":")
        with self._lock:
            pod = self._objects.get(("", "v1", "pods", m["namespace"], name))
        if pod is None:
            return web.json_response(not_found().status, status=404)
        ip = (pod.get("status") or {}).get("podIP")
        if not ip or not port.isdigit():
            error = status_object(503, "ServiceUnavailable", f"pod {name} has no address:port")
            return web.json_response(error, status=503)
        url = f"http://{ip}:{port}/{m['path']}"
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
                async with s.get(url, params=request.query) as resp:
                    body = await resp.read()
                    return web.Response(
                        body=body, status=resp.status, content_type=resp.content_type
                    )
        except (aiohttp.ClientError, TimeoutError) as exc:
            error = status_object(503, "ServiceUnavailable", f"error trying to reach {url}: {exc}")
            return web.json_response(error, status=503)

    def _pod_log(self, ns: str, name: str, query: Mapping[str, str]) -> web.Response:
        with self._lock:
            pod = self._objects.get(("", "v1", "pods", ns, name))
            if pod is None:
                raise APIError(404, "NotFound", f'pods "{name}" not found')
            try:
                body = served_log(pod, self._pod_logs, query)
            except LogRefused as exc:
                raise APIError(400, "BadRequest", str(exc)) from None
        return web.Response(body=body, content_type="text/plain")

    def _resource(
        self, group: str, version: str, plural: str, ns: str, name: str | None, method: str
    ) -> CustomResource | None:
        """The CRD serving this path (None for a built-in group), or 404 as kube-apiserver
        answers for a resource, version or scope it does not serve."""
        if group in BUILTIN_GROUPS:
            return None
        crd = self._crds.get((group, plural))
        if crd is None or version not in crd.schemas:
            raise not_found()
        if ns and not crd.namespaced:
            raise not_found()
        if not ns and crd.namespaced and (name is not None or method != "GET"):
            raise not_found()
        return crd

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        m = request.match_info
        group, version, plural = m.get("group", ""), m["version"], m["plural"]
        ns, name, sub, method = m.get("namespace", ""), m.get("name"), m.get("sub"), request.method
        write: Write | None = None
        try:
            crd = self._resource(group, version, plural, ns, name, method)
            if (group, plural, sub, method) == ("", "pods", "log", "GET"):
                return self._pod_log(ns, name or "", request.query)
            if sub not in (None, "status", "scale") or (
                crd is not None
                and ((sub == "status" and not crd.status) or (sub == "scale" and not crd.scale))
            ):
                raise APIError(404, "NotFound", f"the server could not find {request.path}")
            gvp = self._key(group, version, plural, "", "")[:3]
            if name is None and method == "GET":
                match = query_matcher(request.query, ns)
                if request.query.get("watch") in ("true", "1"):
                    return await self._watch(request, gvp, version, match)
                return web.json_response(self._list(gvp, version, match))
            body = await request.json() if method in ("POST", "PUT", "PATCH") else None
            if method in ("PUT", "PATCH") and not isinstance(body, dict):  # e.g. a JSON patch
                raise APIError(415, "UnsupportedMediaType", "only merge patches are supported")
            write = Write(crd, version, field_validation(request.query))
            with self._lock:
                if name is None and method == "POST":
                    created = self._create((*gvp, ns), body, write)
                    return write.response(self._present(created, version), 201)
                key = (*gvp, ns, name or "")
                current = self._objects.get(key)
                if current is None:
                    raise APIError(404, "NotFound", f'{plural} "{name}" not found')
                if method == "GET":
                    if sub == "scale":
                        served = self._present(current, version)
                        return web.json_response(scale_of(served, self._scale_paths(crd)))
                    return web.json_response(self._present(current, version))
                if method == "DELETE" and sub is None:
                    return web.json_response(self._present(self._delete(key), version))
                if method not in ("PUT", "PATCH"):
                    raise APIError(405, "MethodNotAllowed", f"{method} is not supported here")
                if sub == "scale":
                    scale = self._update_scale(key, current, body, method, write)
                    return web.json_response(scale)
                updated = self._update(key, current, body, method, sub, write)
                return write.response(self._present(updated, version))
        except APIError as exc:
            return web.json_response(exc.status, status=exc.code)
        except json.JSONDecodeError as exc:
            return web.json_response(status_object(400, "BadRequest", str(exc)), status=400)
        finally:
            if write is not None:
                self.warnings += write.warnings

    @staticmethod
    def _scale_paths(crd: CustomResource | None) -> ScalePaths:
        return BUILTIN_SCALE if crd is None or crd.scale is None else crd.scale

    def _create(self, where: tuple[str, str, str, str], body: Any, write: Write) -> Obj:
        if not isinstance(body, dict):
            raise APIError(400, "BadRequest", "the body must be an object")
        group, version, plural, ns = where
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
        body.setdefault("apiVersion", f"{group}/{write.version}" if group else version)
        body.setdefault("kind", self._kinds.get((group, plural), ""))
        if write.crd is not None and write.crd.status:
            body.pop("status", None)  # a status subresource: create ignores the status
        obj = write.admit(body, None)
        obj["apiVersion"] = f"{group}/{version}" if group else version
        if (group, plural) == CRD_RESOURCE:
            self._install(obj)
        return self._write(key, obj)

    def _install(self, crd_doc: Obj) -> None:
        """Serve a CRD created through the API from now on (an update changes nothing: the
        emulator's CRDs are fixed once installed). One that cannot be served is a 422."""
        try:
            crd = custom_resource(crd_doc)
        except (KeyError, TypeError, ValueError) as exc:
            message = f'CustomResourceDefinition "{crd_doc["metadata"]["name"]}" is invalid: {exc}'
            raise APIError(422, "Invalid", message) from exc
        self._crds.setdefault((crd.group, crd.plural), crd)
        self._kinds.setdefault((crd.group, crd.plural), crd.kind)

    @staticmethod
    def _check_version(key: Key, current: Obj, body: Obj) -> None:
        want_rv = (body.get("metadata") or {}).get("resourceVersion")
        if want_rv and want_rv != current["metadata"]["resourceVersion"]:
            raise APIError(
                409, "Conflict", f'Operation cannot be fulfilled on {key[2]} "{key[4]}": '
                "the object has been modified; please apply your changes to the latest version"
            )  # fmt: skip

    def _update(
        self, key: Key, current: Obj, body: Obj, method: str, sub: str | None, write: Write
    ) -> Obj:
        served = self._present(current, write.version)  # patches apply to what clients see
        new = merge_patch(served, body) if method == "PATCH" else copy.deepcopy(body)
        self._check_version(key, current, body)
        has_status = write.crd is None or write.crd.status
        if sub == "status":  # only the status changes
            new = {**copy.deepcopy(served), "status": new.get("status")}
        elif has_status and "status" in current:
            new["status"] = copy.deepcopy(served["status"])
        elif has_status:
            new.pop("status", None)
        meta = new.setdefault("metadata", {})
        for f in ("deletionTimestamp", "deletionGracePeriodSeconds"):  # only DELETE sets them
            if f in current["metadata"]:
                meta[f] = current["metadata"][f]
            else:
                meta.pop(f, None)
        new.setdefault("apiVersion", served["apiVersion"])
        new.setdefault("kind", served.get("kind", ""))
        new = write.admit(new, served)
        new["apiVersion"] = current["apiVersion"]
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            return self._remove(key) or current  # the last finalizer is gone
        return self._write(key, new, current)

    def _update_scale(self, key: Key, current: Obj, body: Obj, method: str, write: Write) -> Obj:
        paths = self._scale_paths(write.crd)
        served = self._present(current, write.version)
        scale = merge_patch(scale_of(served, paths), body) if method == "PATCH" else body
        self._check_version(key, current, body)
        replicas = (scale.get("spec") or {}).get("replicas")
        if type(replicas) is not int or replicas < 0:
            raise invalid_error(
                "autoscaling", "Scale", key[4],
                [invalid("spec.replicas", replicas, "must be greater than or equal to 0")],
            )  # fmt: skip
        new = copy.deepcopy(served)
        set_path(new, paths.spec_replicas, replicas)
        new = write.admit(new, served)
        new["apiVersion"] = current["apiVersion"]
        return scale_of(self._write(key, new, current), paths)

    def _matching(self, gvp: GVP, version: str, match: Callable[[Obj], bool]) -> list[Obj]:
        return [self._present(o, version) for k, o in sorted(self._objects.items())
                if k[:3] == gvp and match(o)]  # fmt: skip

    def _list(self, gvp: GVP, version: str, match: Callable[[Obj], bool]) -> Obj:
        group, _, plural = gvp
        with self._lock:
            items, rv = self._matching(gvp, version, match), str(self._rv)
        return {
            "kind": self._kinds.get((group, plural), "") + "List",
            "apiVersion": f"{group}/{version}" if group else version,
            "metadata": {"resourceVersion": rv},
            "items": items,
        }

    async def _watch(
        self, request: web.Request, gvp: GVP, version: str, match: Callable[[Obj], bool]
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
                events = [("ADDED", o) for o in self._matching(gvp, version, match)]
        self.open_watches += 1
        try:
            while not self._closing:
                changed = self._changed
                with self._lock:
                    if last < self._floor or epoch != self._epoch:
                        message = f"too old resource version: {last} ({self._floor})"
                        events.append(("ERROR", status_object(410, "Expired", message)))
                    else:
                        events += self._events_since(last, gvp, version, match)
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
        self, last: int, gvp: GVP, version: str, match: Callable[[Obj], bool]
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
                out.append((kind, self._present(obj, version)))
        return out


def field_validation(query: Mapping[str, str]) -> str:
    value = query.get("fieldValidation") or "Warn"
    if value not in FIELD_VALIDATION:
        raise APIError(
            400, "BadRequest",
            f"fieldValidation must be one of {', '.join(FIELD_VALIDATION)}, not {value!r}",
        )  # fmt: skip
    return value


class Write:
    """One write's admission of a custom resource, as kube-apiserver's CR handler does it:
    prune (fieldValidation decides what an unknown field costs), default, validate."""

    def __init__(self, crd: CustomResource | None, version: str, validation: str) -> None:
        self.crd, self.version, self.validation = crd, version, validation
        self.warnings: list[str] = []

    def admit(self, obj: Obj, old: Obj | None) -> Obj:
        errors = name_errors(obj) if old is None else []
        errors += label_errors(obj, nested=self.crd is None)
        if self.crd is None and is_event(obj):
            errors += event_errors(obj, old)
        if self.crd is None:
            if errors:
                group = split_api_version(obj.get("apiVersion", ""))[0]
                raise invalid_error(group, obj.get("kind", ""), obj["metadata"]["name"], errors)
            return obj
        crd, schema = self.crd, self.crd.schemas[self.version]
        obj = copy.deepcopy(obj)
        self._check_type(obj)
        dropped = schema.prune(obj)
        if dropped and self.validation == "Strict":
            unknown = ", ".join(f'unknown field "{p}"' for p in dropped)
            raise APIError(
                400, "BadRequest", f'{crd.kind} in version "{self.version}" cannot be handled '
                f"as a {crd.kind}: strict decoding error: {unknown}",
            )  # fmt: skip
        if self.validation == "Warn":
            self.warnings += [f'unknown field "{p}"' for p in dropped]
        schema.default(obj)
        errors += schema.validate(obj, old)
        if errors:
            raise invalid_error(crd.group, crd.kind, obj["metadata"]["name"], errors)
        return obj

    def _check_type(self, obj: Obj) -> None:
        want = f"{self.crd.group}/{self.version}"
        if obj.get("apiVersion") != want:
            raise APIError(
                400, "BadRequest", f"the API version in the data ({obj.get('apiVersion')}) "
                f"does not match the expected API version ({want})",
            )  # fmt: skip
        if obj.get("kind") != self.crd.kind:
            raise APIError(
                400, "BadRequest", f"the kind in the data ({obj.get('kind')}) does not match "
                f"the expected kind ({self.crd.kind})",
            )  # fmt: skip

    def response(self, obj: Obj, status: int = 200) -> web.Response:
        headers = CIMultiDict(("Warning", f"299 - {json.dumps(w)}") for w in self.warnings)
        return web.json_response(obj, status=status, headers=headers)


def name_errors(obj: Obj) -> list[FieldError]:
    name = obj["metadata"]["name"]
    if obj.get("kind") == "Service" and obj.get("apiVersion") == "v1":
        if len(name) > LABEL_MAX:
            return [invalid("metadata.name", name, f"must be no more than {LABEL_MAX} characters")]
        if not DNS_1035.match(name):
            return [invalid("metadata.name", name, DNS_1035_MESSAGE)]
    if len(name) > 253 or not DNS_SUBDOMAIN.match(name):
        return [invalid("metadata.name", name, NAME_MESSAGE)]
    return []


def label_errors(obj: Obj, nested: bool) -> list[FieldError]:
    """metadata.labels, and with `nested` (a built-in kind) the label maps of NESTED_LABELS:
    keys are qualified names, values at most 63 characters of LABEL_VALUE."""
    paths = ("metadata.labels", *(NESTED_LABELS if nested else ()))
    errors = []
    for path in paths:
        labels = get_path(obj, path)
        if not isinstance(labels, dict) or (path == "spec.selector" and "matchLabels" in labels):
            continue
        for key, value in labels.items():
            prefix, _, name = str(key).rpartition("/")
            if (
                not LABEL_NAME.match(name)
                or len(name) > LABEL_MAX
                or (prefix and (len(prefix) > 253 or not DNS_SUBDOMAIN.match(prefix)))
            ):
                errors.append(invalid(f"{path}", key, "name part must be a qualified name"))
            if not isinstance(value, str):
                errors.append(invalid(f"{path}", value, "a label value must be a string"))
            elif len(value) > LABEL_MAX:
                errors.append(
                    invalid(f"{path}", value, f"must be no more than {LABEL_MAX} characters")
                )
            elif not LABEL_VALUE.match(value):
                errors.append(invalid(f"{path}", value, LABEL_VALUE_MESSAGE))
    return errors


def get_path(obj: Obj, path: str) -> Any:
    for part in path.strip(".").split("."):
        obj = obj.get(part) if isinstance(obj, dict) else None
    return obj


def set_path(obj: Obj, path: str, value: Any) -> None:
    *parents, last = path.strip(".").split(".")
    for part in parents:
        obj = obj.setdefault(part, {})
    obj[last] = value


def scale_of(obj: Obj, paths: ScalePaths) -> Obj:
    """autoscaling/v1 Scale over the paths a CRD's scale subresource declares."""
    meta = obj["metadata"]
    fields = ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
    scale = {
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {f: meta[f] for f in fields if f in meta},
        "spec": {"replicas": get_path(obj, paths.spec_replicas) or 0},
        "status": {"replicas": get_path(obj, paths.status_replicas) or 0},
    }
    selector = paths.label_selector and get_path(obj, paths.label_selector)
    if selector:
        scale["status"]["selector"] = selector
    return scale
