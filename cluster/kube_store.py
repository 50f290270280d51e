"""The store over a Kubernetes API server (see store.py), through the official client.

Objects stay plain dicts: every call goes through the client's generic request path
(`ApiClient.param_serialize` + `call_api`) to the REST paths `/api/v1/...` and
`/apis/{group}/{version}/...`, so core kinds and custom resources are handled alike and nothing
is converted to and from the client's models. The client is synchronous: requests run in
`asyncio.to_thread`, and each watch streams in its own thread that feeds an asyncio queue (a
watch lasts minutes; it must not hold one of the default executor's few workers).

HTTP errors become the store's: 404 NotFound, 409 AlreadyExists or Conflict (by the Status
reason), 410 Gone (also as a watch's ERROR event), 400/422 Invalid; a failed connection
is Unavailable.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any
from urllib.parse import quote

import urllib3
from kubernetes.client import ApiClient, ApiException

from infergw.cluster.store import (
    AlreadyExists,
    Conflict,
    Gone,
    Invalid,
    Kind,
    NotFound,
    Obj,
    StoreError,
    Unavailable,
    kind_of,
)

log = logging.getLogger("cluster.kube_store")

_JSON = "application/json"
_MERGE_PATCH = "application/merge-patch+json"
_END = object()  # a watch stream ended


def api_client_from_environment() -> ApiClient:
    """In a pod, its service account; elsewhere $KUBECONFIG (read now: the client reads it once,
    at import) or ~/.kube/config. kubernetes.config.ConfigException when there is none."""
    from kubernetes import config
    from kubernetes.client import Configuration

    cfg = Configuration()
    try:
        config.load_incluster_config(client_configuration=cfg)
    except config.ConfigException:
        path = os.environ.get("KUBECONFIG")
        config.load_kube_config(config_file=path, client_configuration=cfg)
    return ApiClient(cfg)


def error_from(status: int, body: bytes | str | Obj | None) -> StoreError:
    """The store's exception for an HTTP error status and its body (a Status, usually)."""
    if isinstance(body, dict):
        st = body
    else:
        try:
            st = json.loads(body or b"{}")
        except ValueError:
            st = {}
        if not isinstance(st, dict):
            st = {}
    if isinstance(body, bytes):
        body = body.decode(errors="replace")
    message = st.get("message") or (body if isinstance(body, str) else "") or f"HTTP {status}"
    reason = st.get("reason", "")
    if status == 404:
        return NotFound(message)
    if status == 409:
        if reason == "AlreadyExists" or (not reason and "already exists" in message):
            return AlreadyExists(message)
        return Conflict(message)
    if status == 410:
        return Gone(message)
    if status in (400, 422):
        return Invalid(message)
    err = Unavailable(message) if status >= 500 or status == 0 else StoreError(message)
    err.code = status or err.code
    return err


def _typed(kind: Kind, obj: Obj) -> Obj:
    """List items of built-in kinds come without apiVersion and kind: put them back."""
    obj.setdefault("apiVersion", kind.api_version)
    obj.setdefault("kind", kind.kind)
    return obj


def _lines(resp: urllib3.BaseHTTPResponse) -> Iterator[bytes]:
    """The lines of a streamed response as they arrive (a chunk may hold part of one)."""
    buffer = b""
    for chunk in resp.stream(amt=None, decode_content=False):
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        yield from lines
    if buffer:
        yield buffer


class KubeStore:
    """`Store` over the API server that `api_client` talks to.

    `watch_timeout` is the timeoutSeconds of each watch request (the server ends the stream
    then, with a bookmark, and the informer resumes from it); `request_timeout` bounds every
    other request.
    """

    def __init__(
        self, api_client: ApiClient, *, watch_timeout: int = 300, request_timeout: float = 30.0
    ) -> None:
        self.api = api_client
        self.watch_timeout = watch_timeout
        self.request_timeout = request_timeout

    @classmethod
    def from_environment(cls, **kwargs: Any) -> KubeStore:
        """The store over api_client_from_environment()."""
        return cls(api_client_from_environment(), **kwargs)

    def close(self) -> None:
        self.api.close()

    # ---- Store ------------------------------------------------------------------------------

    async def get(self, kind: Kind, namespace: str, name: str) -> Obj | None:
        try:
            return _typed(kind, await self._call("GET", _path(kind, _ns(kind, namespace), name)))
        except NotFound:
            return None

    async def list(
        self, kind: Kind, namespace: str | None = None, labels: dict[str, str] | None = None
    ) -> tuple[list[Obj], str]:
        query = []
        if labels:
            query.append(("labelSelector", _label_selector(labels)))
        body = await self._call("GET", _path(kind, namespace), query=query)
        items = [_typed(kind, o) for o in body.get("items") or []]
        return items, (body.get("metadata") or {}).get("resourceVersion", "")

    async def create(self, obj: Obj) -> Obj:
        kind = kind_of(obj)
        path = _path(kind, _namespace(kind, obj))
        return _typed(kind, await self._call("POST", path, body=obj))

    async def update(self, obj: Obj) -> Obj:
        kind = kind_of(obj)
        path = _path(kind, _namespace(kind, obj), obj["metadata"]["name"])
        return _typed(kind, await self._call("PUT", path, body=obj))

    async def update_status(self, obj: Obj) -> Obj:
        kind = kind_of(obj)
        path = _path(kind, _namespace(kind, obj), obj["metadata"]["name"], "status")
        return _typed(kind, await self._call("PUT", path, body=obj))

    async def delete(self, kind: Kind, namespace: str, name: str) -> None:
        options = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Background"}
        await self._call("DELETE", _path(kind, _ns(kind, namespace), name), body=options)

    async def scale(self, kind: Kind, namespace: str, name: str) -> Obj:
        """The object's autoscaling/v1 Scale: spec.replicas, status.replicas, status.selector."""
        return await self._call("GET", _path(kind, _ns(kind, namespace), name, "scale"))

    async def set_scale(self, kind: Kind, namespace: str, name: str, replicas: int) -> Obj:
        """Set spec.replicas through the scale subresource; returns the new Scale."""
        path = _path(kind, _ns(kind, namespace), name, "scale")
        body = {"spec": {"replicas": replicas}}
        return await self._call("PATCH", path, body=body, content_type=_MERGE_PATCH)

    def pod_page(
        self, namespace: str, pod: str, port: int, path: str, limit: int, timeout: float
    ) -> bytes:
        """A page a pod serves on `port`, through the API server's pod proxy (what `kubectl
        get --raw /api/v1/namespaces/NS/pods/POD:PORT/proxy/PATH` reads): for reading a
        pod's HTTP pages from outside the cluster. At most `limit` + 1 bytes are read, so a
        caller tells a page over its limit by its length. Blocking: run it in a thread."""
        target = quote(f"{pod}:{int(port)}", safe=":")
        url = f"/api/v1/namespaces/{quote(namespace, safe='')}/pods/{target}/proxy/"
        resp = self._open("GET", url + path.lstrip("/"), [], None, _JSON, timeout)
        return _read_bounded(resp, url, limit + 1)

    def container_log_tail(
        self, namespace: str, pod: str, container: str, lines: int, limit: int
    ) -> str:
        """The last `lines` lines of one container's log, at most `limit` bytes of them (GET
        pods/NAME/log?container=&tailLines=&limitBytes=, what `kubectl logs --tail` asks; the
        `get` verb on `pods/log`). At most `limit` bytes are read whatever the server sends.
        Blocking: run it in a thread."""
        url = f"/api/v1/namespaces/{quote(namespace, safe='')}/pods/{quote(pod, safe='')}/log"
        query = [("container", container), ("tailLines", str(lines)), ("limitBytes", str(limit))]
        # the log is text/plain: an Accept of JSON alone is not what it serves
        resp = self._open("GET", url, query, None, _JSON, self.request_timeout, accept="*/*")
        return _read_bounded(resp, url, limit).decode(errors="replace")

    async def watch(
        self,
        kind: Kind,
        namespace: str | None,
        resource_version: str,
        labels: dict[str, str] | None = None,
    ) -> AsyncIterator[tuple[str, Obj]]:
        """(ADDED|MODIFIED|DELETED|BOOKMARK, object) after resource_version, until the server
        ends the stream (watch_timeout); an expired resource_version raises Gone."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        stopped = threading.Event()
        opened: list[urllib3.BaseHTTPResponse] = []

        def put(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                stopped.set()

        query = [
            ("watch", "true"),
            ("allowWatchBookmarks", "true"),
            ("timeoutSeconds", str(self.watch_timeout)),
        ]
        if resource_version:
            query.append(("resourceVersion", resource_version))
        if labels:
            query.append(("labelSelector", _label_selector(labels)))
        path = _path(kind, namespace)
        thread = threading.Thread(
            target=self._stream,
            args=(path, query, put, stopped, opened),
            name=f"watch {kind.plural}",
            daemon=True,
        )
        thread.start()
        try:
            while (item := await queue.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                if not isinstance(item, dict):
                    raise Unavailable(f"watch {path}: not a watch event: {str(item)[:100]}")
                event, obj = item.get("type"), item.get("object") or {}
                if event == "ERROR":
                    status = obj if isinstance(obj, dict) else {}
                    code = status.get("code")
                    raise error_from(code if isinstance(code, int) else 500, status)
                if event != "BOOKMARK" and isinstance(obj, dict):
                    _typed(kind, obj)
                yield event, obj  # an object of the wrong shape is the informer's to refuse
        finally:
            stopped.set()
            for resp in opened:  # wake the thread if it is blocked reading
                try:
                    resp.shutdown()
                except (RuntimeError, ValueError):  # the stream has ended already
                    pass

    # ---- HTTP -------------------------------------------------------------------------------

    def _open(
        self,
        method: str,
        path: str,
        query: list[tuple[str, str]],
        body: Obj | None,
        content_type: str,
        timeout: float | tuple[float, float],
        accept: str = _JSON,
    ) -> urllib3.BaseHTTPResponse:
        headers = {"Accept": accept}
        if body is not None:
            headers["Content-Type"] = content_type
        request = self.api.param_serialize(
            method,
            path,
            query_params=query,
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        try:
            return self.api.call_api(*request, _request_timeout=timeout).response
        except ApiException as exc:
            raise error_from(exc.status or 0, exc.body or exc.reason) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise Unavailable(f"{method} {path}: {exc}") from exc

    def _request(
        self,
        method: str,
        path: str,
        query: list[tuple[str, str]],
        body: Obj | None,
        content_type: str,
    ) -> Obj:
        resp = self._open(method, path, query, body, content_type, self.request_timeout)
        try:
            data = resp.read()
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise Unavailable(f"{method} {path}: {exc}") from exc
        finally:
            resp.release_conn()
        if not 200 <= resp.status < 300:
            raise error_from(resp.status, data)
        try:
            return json.loads(data) if data else {}
        except ValueError as exc:
            raise Unavailable(f"{method} {path}: the answer is not JSON: {exc}") from exc

    async def _call(
        self,
        method: str,
        path: str,
        *,
        query: list[tuple[str, str]] | None = None,
        body: Obj | None = None,
        content_type: str = _JSON,
    ) -> Obj:
        return await asyncio.to_thread(self._request, method, path, query or [], body, content_type)

    def _stream(
        self,
        path: str,
        query: list[tuple[str, str]],
        put: Callable[[Any], None],
        stopped: threading.Event,
        opened: list[urllib3.BaseHTTPResponse],
    ) -> None:
        """In a thread: one watch request, each event put on the queue, then _END."""
        resp = None
        try:
            timeout = (self.request_timeout, self.watch_timeout + self.request_timeout)
            resp = self._open("GET", path, query, None, _JSON, timeout)
            opened.append(resp)  # (watch() shuts it down once stopped is set)
            if stopped.is_set():
                return
            if not 200 <= resp.status < 300:
                put(error_from(resp.status, resp.read()))
                return
            for line in _lines(resp):
                if stopped.is_set():
                    return
                if line.strip():
                    put(json.loads(line))
        except StoreError as exc:
            if not stopped.is_set():
                put(exc)
        except (urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
            if not stopped.is_set():
                put(Unavailable(f"watch {path}: {exc}"))
        finally:
            if resp is not None and stopped.is_set():
                resp.close()  # shut down mid-stream: the connection is not reusable
            elif resp is not None:
                resp.release_conn()
            put(_END)


def _read_bounded(resp: urllib3.BaseHTTPResponse, url: str, limit: int) -> bytes:
    """At most `limit` bytes of an answer; the store's error for a failed one."""
    try:
        data = resp.read(limit)
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise Unavailable(f"GET {url}: {exc}") from exc
    finally:
        resp.close()  # perhaps not read to its end: the connection is not reusable
    if not 200 <= resp.status < 300:
        raise error_from(resp.status, data)
    return data


def _label_selector(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def _namespace(kind: Kind, obj: Obj) -> str:
    return _ns(kind, (obj.get("metadata") or {}).get("namespace"))


def _ns(kind: Kind, namespace: str | None) -> str:
    """One object's namespace, defaulted as MemoryStore does."""
    return (namespace or "default") if kind.namespaced else ""


def _path(
    kind: Kind, namespace: str | None, name: str | None = None, sub: str | None = None
) -> str:
    """/api/v1[/namespaces/{ns}]/{plural}[/{name}[/{sub}]], or under /apis/{group}/{version}."""
    path = f"/apis/{kind.group}/{kind.version}" if kind.group else f"/api/{kind.version}"
    if kind.namespaced and namespace:
        path += f"/namespaces/{quote(namespace, safe='')}"
    path += f"/{kind.plural}"
    if name is not None:
        path += f"/{quote(name, safe='')}"
        if sub:
            path += f"/{sub}"
    return path
