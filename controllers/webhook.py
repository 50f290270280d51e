"""The validating admission webhook: `AdmissionReview` v1 over HTTPS, for our kinds.

    POST /validate   an AdmissionReview; answered with allowed or denied and every problem found
    GET  /healthz    "ok"
    GET  /metrics    infergate_webhook_admissions_total{kind,operation,allowed}, in its own registry

A CREATE or UPDATE of a kind that `api` knows is checked with `validate_dict` (the
CRDs' schema and CEL rules, and the pod templates' fields the controllers read) and, for an
UPDATE, with `validate_update` (the CRDs' transition rules, such as ModelRoute's immutable
spec.modelName). A ModelInfer whose pods would get power over their node (privileged, added
capabilities, hostPath, host namespaces) is refused unless its namespace carries the label
infergate.io/allow-privileged-pods=true: creating a ModelInfer makes the controllers create
its pods, so without this anyone who may write ModelInfers could take a node. The webhook reads
the namespace (`namespace_labels`); when it cannot, it refuses such a template. DELETE, CONNECT
and other kinds are allowed. `admit` is the decision alone, pure, so standalone mode applies
the same checks to an object read from YAML before it accepts it:

    response = admit(review_for(obj, old))["response"]
    if not response["allowed"]: reject(response["status"]["message"])

gateway-manifests/webhook.yaml registers it with the API server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import tempfile
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest

from infergw import api
from infergw.api import networking
from infergw.cluster import certs
from infergw.cluster.store import NAMESPACE, Store

log = logging.getLogger("controllers.webhook")

REVIEW_API_VERSION = "admission.k8s.io/v1"
REVIEW_KIND = "AdmissionReview"
OPERATIONS = ("CREATE", "UPDATE", "DELETE", "CONNECT")
VALIDATED_OPERATIONS = ("CREATE", "UPDATE")
# An AdmissionReview carries the object twice on UPDATE; etcd keeps objects up to 1.5 MiB.
MAX_BODY_BYTES = 8 * 1024 * 1024
CERT_RELOAD_SECONDS = 30.0
# The names the API server uses to reach the webhook Service (gateway-manifests/webhook.yaml):
# a certificate made without a cert dir names them, and localhost for tests and standalone mode.
SERVICE_NAMES = (
    "infergate-controllers",
    "infergate-controllers.infergate-system",
    "infergate-controllers.infergate-system.svc",
    "infergate-controllers.infergate-system.svc.cluster.local",
)
CERT_HOSTS = ("localhost", "127.0.0.1", *SERVICE_NAMES)
CERT_COMMON_NAME = "infergate-controllers"

# The CRDs' transition rules (`self == oldSelf` on a field): (apiVersion, kind) → the field's
# path and the rule's message, word for word. As in the API server, a rule applies when the
# field is set in both the old and the new object.
IMMUTABLE: dict[tuple[str, str], tuple[tuple[tuple[str, ...], str], ...]] = {
    (networking.GROUP_VERSION, "ModelRoute"): ((("spec", "modelName"), "modelName is immutable"),),
}


class ReviewError(ValueError):
    """The body is not an AdmissionReview v1 request this webhook can answer."""


# ---- the decision, pure -------------------------------------------------------------------------

_MISSING = object()


def _field(obj: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(obj, dict) or key not in obj:
            return _MISSING
        obj = obj[key]
    return obj


def validate_update(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The problems an UPDATE from `old` to `new` has beyond `new`'s own: changed immutable
    fields, as `path: message`."""
    rules = IMMUTABLE.get((new.get("apiVersion"), new.get("kind")), ())  # type: ignore[arg-type]
    problems = []
    for path, message in rules:
        before, after = _field(old, path), _field(new, path)
        if before is not _MISSING and after is not _MISSING and before != after:
            problems.append(f"{'.'.join(path)}: {message}")
    return problems


@dataclass(frozen=True, slots=True)
class Decision:
    """What admit answered, with what the metrics count it by."""

    review: dict[str, Any]
    kind: str
    operation: str
    allowed: bool


def _text(value: Any, where: str, *, empty: bool = False) -> str:
    if not isinstance(value, str) or (not value and not empty):
        raise ReviewError(f"{where} must be a {'' if empty else 'non-empty '}string")
    return value


def _read_request(review: Any) -> dict[str, Any]:
    if not isinstance(review, dict):
        raise ReviewError(f"an AdmissionReview must be a JSON object, not {type(review).__name__}")
    if review.get("apiVersion") != REVIEW_API_VERSION or review.get("kind") != REVIEW_KIND:
        raise ReviewError(
            f"expected apiVersion {REVIEW_API_VERSION} kind {REVIEW_KIND}, "
            f"got {review.get('apiVersion')!r} {review.get('kind')!r}"
        )
    request = review.get("request")
    if not isinstance(request, dict):
        raise ReviewError("request must be an object")
    _text(request.get("uid"), "request.uid")
    if request.get("operation") not in OPERATIONS:
        raise ReviewError(f"request.operation must be one of {', '.join(OPERATIONS)}")
    gvk = request.get("kind")
    if not isinstance(gvk, dict):
        raise ReviewError("request.kind must be an object with group, version and kind")
    _text(gvk.get("group", ""), "request.kind.group", empty=True)
    _text(gvk.get("version"), "request.kind.version")
    _text(gvk.get("kind"), "request.kind.kind")
    return request


def _answer(uid: str, allowed: bool, code: int, message: str, reason: str = "") -> dict[str, Any]:
    status = {"code": code, **({"reason": reason} if reason else {}), "message": message}
    return {
        "apiVersion": REVIEW_API_VERSION,
        "kind": REVIEW_KIND,
        "response": {"uid": uid, "allowed": allowed, "status": status},
    }


def decide(review: Any, namespace_labels: dict[str, str] | None = None) -> Decision:
    """admit, with the kind and operation it decided on; ReviewError for a malformed review.
    `namespace_labels`: the labels of the object's namespace (none known: no opt-in)."""
    request = _read_request(review)
    uid, operation, gvk = request["uid"], request["operation"], request["kind"]
    group, kind = gvk.get("group", ""), gvk["kind"]
    api_version = f"{group}/{gvk['version']}" if group else gvk["version"]
    known = (api_version, kind) in api.KINDS
    label = kind if known else "other"

    if not known or operation not in VALIDATED_OPERATIONS:
        why = f"{api_version} {kind} is not validated" if not known else f"{operation} is allowed"
        return Decision(_answer(uid, True, 200, why), label, operation, True)

    obj = request.get("object")
    if not isinstance(obj, dict):
        raise ReviewError(f"request.object must be an object for {operation}")
    old = request.get("oldObject")
    if operation == "UPDATE" and not isinstance(old, dict):
        raise ReviewError("request.oldObject must be an object for UPDATE")

    meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
    name = request.get("name") or meta.get("name") or meta.get("generateName") or "<unnamed>"
    namespace = request.get("namespace") or meta.get("namespace")
    who = f"{kind} {namespace}/{name}" if namespace else f"{kind} {name}"

    # The API server's kind is authoritative: the object is in that version (matchPolicy).
    obj = {**obj, "apiVersion": api_version, "kind": kind}
    try:
        problems = api.validate_dict(obj)
        if operation == "UPDATE":
            problems += validate_update({**old, "apiVersion": api_version, "kind": kind}, obj)
        if not problems:
            problems = api.forbidden_host_powers(obj, namespace_labels or {})
    except Exception as exc:  # a bug in a validator must not let an object through unchecked
        log.exception("validating %s failed", who)
        message = f"{who} could not be validated: {type(exc).__name__}: {exc}"
        return Decision(_answer(uid, False, 500, message, "InternalError"), label, operation, False)

    if problems:
        message = f"{who} is invalid: {'; '.join(problems)}"
        return Decision(_answer(uid, False, 422, message, "Invalid"), label, operation, False)
    return Decision(_answer(uid, True, 200, f"{who} is valid"), label, operation, True)


def admit(review: dict[str, Any], namespace_labels: dict[str, str] | None = None) -> dict[str, Any]:
    """The AdmissionReview response for an AdmissionReview request; ReviewError if malformed."""
    return decide(review, namespace_labels).review


def reviewed_namespace(review: Any) -> str | None:
    """The namespace whose labels decide a review: that of a ModelInfer being written."""
    request = review.get("request") if isinstance(review, dict) else None
    if not isinstance(request, dict) or request.get("operation") not in VALIDATED_OPERATIONS:
        return None
    gvk = request.get("kind")
    namespace = request.get("namespace")
    if not isinstance(gvk, dict) or gvk.get("kind") != "ModelInfer":
        return None
    return namespace if isinstance(namespace, str) and namespace else None


def review_for(
    obj: dict[str, Any], old: dict[str, Any] | None = None, operation: str | None = None
) -> dict[str, Any]:
    """An AdmissionReview request for `obj` (an UPDATE from `old` when given), as the API server
    would send it: for standalone mode, which has no API server in front of `admit`."""
    group, _, version = str(obj.get("apiVersion", "")).rpartition("/")
    meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
    request: dict[str, Any] = {
        "uid": str(uuid.uuid4()),
        "kind": {"group": group, "version": version, "kind": obj.get("kind", "")},
        "operation": operation or ("CREATE" if old is None else "UPDATE"),
        "name": meta.get("name", ""),
        "namespace": meta.get("namespace", ""),
        "object": obj,
    }
    if old is not None:
        request["oldObject"] = old
    return {"apiVersion": REVIEW_API_VERSION, "kind": REVIEW_KIND, "request": request}


# ---- HTTP ---------------------------------------------------------------------------------------


class WebhookMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.admissions = Counter(
            "infergate_webhook_admissions_total",
            "Admission decisions by kind ('other' for kinds not validated), operation and result.",
            ["kind", "operation", "allowed"],
            registry=self.registry,
        )
        self.malformed = Counter(
            "infergate_webhook_malformed_reviews_total",
            "Requests to /validate that were not an AdmissionReview v1 (answered 400).",
            registry=self.registry,
        )


METRICS = web.AppKey("metrics", WebhookMetrics)
# A namespace's labels, None when it does not exist; raises when they cannot be read.
NamespaceLabels = Callable[[str], Awaitable[dict[str, str] | None]]
NAMESPACE_LABELS = web.AppKey("namespace_labels", NamespaceLabels)


def _bad_request(request: web.Request, message: str) -> web.Response:
    request.app[METRICS].malformed.inc()
    log.warning("malformed AdmissionReview from %s: %s", request.remote, message)
    return web.json_response({"error": "malformed AdmissionReview", "message": message}, status=400)


async def _validate(request: web.Request) -> web.Response:
    body = await request.read()
    try:
        review = json.loads(body)
    except (ValueError, RecursionError) as exc:
        return _bad_request(request, f"body is not JSON: {exc}")
    labels = await _namespace_labels(request, reviewed_namespace(review))
    try:
        decision = decide(review, labels)
    except ReviewError as exc:
        return _bad_request(request, str(exc))
    except RecursionError:
        return _bad_request(request, "object is nested too deeply")
    allowed = "true" if decision.allowed else "false"
    request.app[METRICS].admissions.labels(decision.kind, decision.operation, allowed).inc()
    if not decision.allowed:
        log.info("denied %s: %s", decision.operation, decision.review["response"]["status"])
    return web.json_response(decision.review)


async def _namespace_labels(request: web.Request, namespace: str | None) -> dict[str, str]:
    lookup = request.app.get(NAMESPACE_LABELS)
    if namespace is None or lookup is None:
        return {}
    try:
        return await lookup(namespace) or {}
    except Exception as exc:  # no opt-in can be read: host powers stay refused
        log.warning("cannot read namespace %s's labels: %s", namespace, exc)
        return {}


async def _healthz(_: web.Request) -> web.Response:
    return web.Response(text="ok")


async def _metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def namespace_reader(store: Store) -> NamespaceLabels:
    """Namespace labels from a store (the API server, in a cluster)."""

    async def labels(name: str) -> dict[str, str] | None:
        namespace = await store.get(NAMESPACE, "", name)
        return None if namespace is None else namespace["metadata"].get("labels") or {}

    return labels


def build_app(
    metrics: WebhookMetrics | None = None, namespace_labels: NamespaceLabels | None = None
) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[METRICS] = metrics or WebhookMetrics()
    if namespace_labels is not None:
        app[NAMESPACE_LABELS] = namespace_labels
    app.router.add_post("/validate", _validate)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/metrics", _metrics)
    return app


# ---- serving ------------------------------------------------------------------------------------


def webhook_cert(*extra_hosts: str) -> certs.ServingCert:
    """A throwaway CA and a certificate it signs for the Service's names, localhost and
    `extra_hosts`: what the webhook serves without a cert dir, and what to put in its Secret
    by hand without cert-manager (gateway-manifests/webhook.yaml)."""
    return certs.serving_cert((*extra_hosts, *CERT_HOSTS), CERT_COMMON_NAME)


def _ssl_context(
    cert_dir: Path | None, host: str
) -> tuple[ssl.SSLContext, tuple[Path, Path] | None]:
    """The server's TLS context, and the files to watch for rotation (None when generated)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_dir is not None:
        files = certs.cert_files(cert_dir)
        ctx.load_cert_chain(*files)
        return ctx, files
    generated = webhook_cert(*([host] if host and host not in ("0.0.0.0", "::") else []))
    with tempfile.TemporaryDirectory() as tmp:  # ssl loads keys from files only
        written = generated.write(Path(tmp))
        ctx.load_cert_chain(written / "tls.crt", written / "tls.key")
    log.warning("no cert dir: serving with a self-signed certificate the API server will not trust")
    return ctx, None


async def _reload_certs(ctx: ssl.SSLContext, files: tuple[Path, Path], interval: float) -> None:
    """Load the certificate again when its files change (cert-manager renews them in place);
    new connections use it, open ones keep theirs."""

    def stamp() -> tuple[float, ...]:
        return tuple(p.stat().st_mtime for p in files)

    seen = stamp()
    while True:
        await asyncio.sleep(interval)
        try:
            now = stamp()
            if now != seen:
                ctx.load_cert_chain(*files)
                seen = now
                log.info("reloaded the webhook certificate from %s", files[0].parent)
        except (OSError, ssl.SSLError) as exc:  # half-written during a rotation: try again later
            log.warning("cannot reload the webhook certificate: %s", exc)


async def serve_webhook(
    host: str,
    port: int,
    cert_dir: Path | str | None = None,
    *,
    metrics: WebhookMetrics | None = None,
    namespace_labels: NamespaceLabels | None = None,
    ready: asyncio.Event | None = None,
    reload_interval: float = CERT_RELOAD_SECONDS,
) -> None:
    """Serve HTTPS on host:port until cancelled. `cert_dir` holds tls.crt and tls.key (a
    mounted Secret, reloaded when it changes); without it a certificate is made at start.
    `namespace_labels` reads a namespace's labels (in a cluster, from the API server)."""
    ctx, files = _ssl_context(Path(cert_dir) if cert_dir is not None else None, host)
    runner = web.AppRunner(build_app(metrics, namespace_labels), access_log=None)
    await runner.setup()
    reloader = None
    try:
        await web.TCPSite(runner, host, port, ssl_context=ctx, reuse_address=True).start()
        if files is not None:
            reloader = asyncio.create_task(_reload_certs(ctx, files, reload_interval))
        log.info("admission webhook on https://%s:%d/validate", host, port)
        if ready is not None:
            ready.set()
        await asyncio.Event().wait()
    finally:
        if reloader is not None:
            reloader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reloader
        await runner.cleanup()
