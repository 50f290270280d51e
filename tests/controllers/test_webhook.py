"""The admission webhook (controllers/webhook.py) over real HTTPS, and its manifest.

A server on 127.0.0.1 with a certificate from a CA made by `webhook_cert`; the client trusts
only that CA, as the API server trusts the caBundle. Every example in examples/crds/ is
allowed; broken ones are denied naming the field; ModelRoute's modelName cannot change; DELETE
and other kinds pass; a malformed review is a 400 and the server keeps serving; the decisions
are counted; and the pure `admit` answers exactly as the server does.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from infergw.api import ALLOW_PRIVILEGED_LABEL
from infergw.cluster.store import MODEL_INFER, POD
from infergw.controllers.memory_store import MemoryStore
from infergw.controllers.modelinfer import ModelInferReconciler
from infergw.controllers.webhook import (
    SERVICE_NAMES,
    WebhookMetrics,
    admit,
    review_for,
    serve_webhook,
    validate_update,
    webhook_cert,
)
from tests.conftest import free_port
from tests.paths import CRD_EXAMPLES, ROOT

EXAMPLE_FILES = sorted(CRD_EXAMPLES.glob("*.yaml"))
CRDS = ROOT / "crds"

Obj = dict[str, Any]


def example(name: str) -> Obj:
    return yaml.safe_load((CRD_EXAMPLES / name).read_text())


@dataclass
class Webhook:
    url: str
    client: aiohttp.ClientSession
    metrics: WebhookMetrics

    async def post(self, body: Any) -> tuple[int, Any]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"content-type": "application/json"}
        async with self.client.post(f"{self.url}/validate", data=data, headers=headers) as resp:
            return resp.status, await resp.json()

    async def review(self, review: Obj) -> Obj:
        status, body = await self.post(review)
        assert status == 200, body
        return body

    def count(self, kind: str, operation: str, allowed: bool) -> float:
        labels = {"kind": kind, "operation": operation, "allowed": str(allowed).lower()}
        value = self.metrics.registry.get_sample_value("infergate_webhook_admissions_total", labels)
        return value or 0.0


@contextlib.asynccontextmanager
async def serving(cert_dir: Path | None, **kwargs: Any) -> AsyncIterator[str]:
    """serve_webhook in a task for the block; yields its https URL."""
    port = free_port()
    ready = asyncio.Event()
    task = asyncio.create_task(serve_webhook("127.0.0.1", port, cert_dir, ready=ready, **kwargs))
    waiter = asyncio.create_task(ready.wait())
    await asyncio.wait({task, waiter}, timeout=5, return_when=asyncio.FIRST_COMPLETED)
    if not ready.is_set():
        waiter.cancel()
        task.cancel()
        raise RuntimeError(f"webhook did not start: {task.exception() if task.done() else '?'}")
    try:
        yield f"https://127.0.0.1:{port}"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def trusting(ca: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca))


@pytest.fixture
async def webhook(tmp_path: Path) -> AsyncIterator[Webhook]:
    cert_dir = webhook_cert().write(tmp_path / "certs")
    metrics = WebhookMetrics()
    async with serving(cert_dir, metrics=metrics) as url:
        connector = aiohttp.TCPConnector(ssl=trusting(cert_dir / "ca.crt"))
        async with aiohttp.ClientSession(connector=connector) as client:
            yield Webhook(url, client, metrics)


def response_of(review: Obj) -> Obj:
    assert review["apiVersion"] == "admission.k8s.io/v1"
    assert review["kind"] == "AdmissionReview"
    return review["response"]


# ---- allowed ------------------------------------------------------------------------------------


async def test_every_example_is_allowed_and_the_uid_is_echoed(webhook: Webhook) -> None:
    assert len(EXAMPLE_FILES) == 6
    for path in EXAMPLE_FILES:
        obj = yaml.safe_load(path.read_text())
        review = review_for(obj)
        response = response_of(await webhook.review(review))
        assert response["uid"] == review["request"]["uid"]
        assert response["allowed"] is True, (path.name, response)
        assert response["status"]["code"] == 200
        assert webhook.count(obj["kind"], "CREATE", True) == 1


async def test_delete_is_allowed_whatever_the_object(webhook: Webhook) -> None:
    broken = example("modelroute.yaml")
    broken["spec"]["rules"] = []
    review = review_for(broken, operation="DELETE")
    review["request"]["oldObject"] = review["request"].pop("object")
    review["request"]["object"] = None
    response = response_of(await webhook.review(review))
    assert response["allowed"] is True
    assert response["uid"] == review["request"]["uid"]
    assert webhook.count("ModelRoute", "DELETE", True) == 1


async def test_a_kind_we_do_not_know_is_allowed(webhook: Webhook) -> None:
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "x", "namespace": "default"},
        "spec": "not even an object",
    }
    response = response_of(await webhook.review(review_for(deployment)))
    assert response["allowed"] is True
    assert "apps/v1 Deployment is not validated" in response["status"]["message"]
    assert webhook.count("other", "CREATE", True) == 1


# ---- denied -------------------------------------------------------------------------------------


def _bad_enum(o: Obj) -> None:
    o["spec"]["inferenceEngine"] = "Triton"


def _port_out_of_bounds(o: Obj) -> None:
    o["spec"]["workloadPort"]["port"] = 70000


def _weight_out_of_bounds(o: Obj) -> None:
    o["spec"]["rules"][1]["targetModels"][0]["weight"] = 101


def _wrong_type(o: Obj) -> None:
    o["spec"]["replicas"] = "two"


def _min_above_max(o: Obj) -> None:  # CEL: self.minReplicas <= self.maxReplicas
    o["spec"]["prefillDecode"]["decode"]["minReplicas"] = 9


def _sglang_connector_on_vllm(o: Obj) -> None:  # CEL across backend.kvConnector and engine type
    o["spec"]["backend"]["kvConnector"]["type"] = "sglang"


def _removed_retry_interval(o: Obj) -> None:  # CEL: a field kept only to be refused
    o["spec"]["trafficPolicy"]["retry"]["retryInterval"] = "100ms"


def _weight_on_some_targets(o: Obj) -> None:  # CEL: weight on all targetModels or on none
    del o["spec"]["rules"][1]["targetModels"][1]["weight"]


def _name_with_a_path(o: Obj) -> None:  # the local runtime makes log file names of it
    o["metadata"]["name"] = "../../etc/x"


BROKEN: list[tuple[str, Callable[[Obj], None], str]] = [
    (
        "modelinfer.yaml",
        _name_with_a_path,
        "metadata.name: must be a lowercase DNS subdomain of at most 253 characters",
    ),
    (
        "modelserver.yaml",
        _bad_enum,
        "spec.inferenceEngine: must be one of vLLM, SGLang, TRTLLM, Simulator",
    ),
    ("modelserver.yaml", _port_out_of_bounds, "spec.workloadPort.port: must be 1..65535"),
    ("modelroute.yaml", _weight_out_of_bounds, "spec.rules[1].targetModels[0].weight: must be"),
    ("modelinfer.yaml", _wrong_type, "spec.replicas: Expected `int"),
    (
        "autoscalingpolicybinding.yaml",
        _min_above_max,
        "spec.prefillDecode.decode: minReplicas must not exceed maxReplicas",
    ),
    (
        "model.yaml",
        _sglang_connector_on_vllm,
        "spec: kvConnector type sglang goes with engine type SGLang, and only with it",
    ),
    (
        "modelserver.yaml",
        _removed_retry_interval,
        "spec.trafficPolicy.retry: retryInterval is not supported",
    ),
    (
        "modelroute.yaml",
        _weight_on_some_targets,
        "spec.rules[1].targetModels: set weight on all targetModels or on none",
    ),
]


@pytest.mark.parametrize(
    ("file", "breakage", "expected"), BROKEN, ids=[b.__name__.lstrip("_") for _, b, _ in BROKEN]
)
async def test_a_broken_object_is_denied_naming_the_field(
    webhook: Webhook, file: str, breakage: Callable[[Obj], None], expected: str
) -> None:
    obj = example(file)
    breakage(obj)
    review = review_for(obj)
    response = response_of(await webhook.review(review))
    assert response["uid"] == review["request"]["uid"]
    assert response["allowed"] is False
    status = response["status"]
    assert (status["code"], status["reason"]) == (422, "Invalid")
    who = f"{obj['kind']} default/{obj['metadata']['name']} is invalid: "
    assert status["message"].startswith(who), status["message"]
    assert expected in status["message"]
    assert webhook.count(obj["kind"], "CREATE", False) == 1


async def test_every_problem_is_reported_at_once(webhook: Webhook) -> None:
    obj = example("modelserver.yaml")
    _bad_enum(obj)
    _port_out_of_bounds(obj)
    message = response_of(await webhook.review(review_for(obj)))["status"]["message"]
    problems = message.split(" is invalid: ", 1)[1].split("; ")
    assert "spec.inferenceEngine: must be one of vLLM, SGLang, TRTLLM, Simulator" in problems
    assert "spec.workloadPort.port: must be 1..65535" in problems


# ---- UPDATE -------------------------------------------------------------------------------------


async def test_changing_a_model_routes_model_name_is_denied(webhook: Webhook) -> None:
    old = example("modelroute.yaml")
    new = copy.deepcopy(old)
    new["spec"]["modelName"] = "llama-3-70b"
    review = review_for(new, old)
    assert review["request"]["operation"] == "UPDATE"
    response = response_of(await webhook.review(review))
    assert response["allowed"] is False
    assert response["uid"] == review["request"]["uid"]
    assert response["status"]["message"] == (
        "ModelRoute default/llama-3-8b is invalid: spec.modelName: modelName is immutable"
    )
    assert webhook.count("ModelRoute", "UPDATE", False) == 1


async def test_other_updates_are_allowed_and_still_validated(webhook: Webhook) -> None:
    old = example("modelroute.yaml")
    new = copy.deepcopy(old)
    new["spec"]["rules"][1]["targetModels"][0]["weight"] = 50
    assert response_of(await webhook.review(review_for(new, old)))["allowed"] is True
    _weight_out_of_bounds(new)
    new["spec"]["modelName"] = "other"
    message = response_of(await webhook.review(review_for(new, old)))["status"]["message"]
    assert "spec.rules[1].targetModels[0].weight: must be 0..100" in message
    assert "spec.modelName: modelName is immutable" in message
    assert webhook.count("ModelRoute", "UPDATE", True) == 1
    assert webhook.count("ModelRoute", "UPDATE", False) == 1


def test_validate_update_follows_the_crds_transition_rule() -> None:
    old = example("modelroute.yaml")
    same = copy.deepcopy(old)
    assert validate_update(old, same) == []
    renamed = copy.deepcopy(old)
    renamed["spec"]["modelName"] = "x"
    assert validate_update(old, renamed) == ["spec.modelName: modelName is immutable"]
    # `self == oldSelf` on a field runs only when both objects have the field, as in the API server.
    unset = copy.deepcopy(old)
    del unset["spec"]["modelName"]
    assert validate_update(old, unset) == []
    assert validate_update(unset, old) == []
    # Kinds without transition rules have nothing to compare.
    server = example("modelserver.yaml")
    changed = copy.deepcopy(server)
    changed["spec"]["model"] = "other"
    assert validate_update(server, changed) == []


# ---- malformed ----------------------------------------------------------------------------------


def _valid_review() -> Obj:
    return review_for(example("modelserver.yaml"))


def _without(path: tuple[str, ...]) -> Obj:
    review = _valid_review()
    target = review
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    return review


MALFORMED: list[tuple[str, Any, str]] = [
    ("not-json", b"{this is not json", "body is not JSON"),
    ("not-utf8", b"\xff\xfe\x00", "body is not JSON"),
    ("array", [1, 2], "must be a JSON object"),
    ("wrong-version", {**_valid_review(), "apiVersion": "admission.k8s.io/v1beta1"}, "expected"),
    ("wrong-kind", {**_valid_review(), "kind": "Pod"}, "expected apiVersion"),
    ("no-request", _without(("request",)), "request must be an object"),
    ("no-uid", _without(("request", "uid")), "request.uid"),
    ("no-operation", _without(("request", "operation")), "request.operation"),
    ("no-kind", _without(("request", "kind")), "request.kind"),
    ("no-object", _without(("request", "object")), "request.object"),
    (
        "update-without-old",
        {**_valid_review(), "request": {**_valid_review()["request"], "operation": "UPDATE"}},
        "request.oldObject",
    ),
]


@pytest.mark.parametrize(
    ("body", "expected"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED]
)
async def test_a_malformed_review_is_a_400_and_the_server_keeps_serving(
    webhook: Webhook, body: Any, expected: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="controllers.webhook"):
        status, answer = await webhook.post(body)
    assert status == 400
    assert answer["error"] == "malformed AdmissionReview"
    assert expected in answer["message"]
    assert any("malformed AdmissionReview" in r.getMessage() for r in caplog.records)
    sample = webhook.metrics.registry.get_sample_value("infergate_webhook_malformed_reviews_total")
    assert sample == 1
    response = response_of(await webhook.review(_valid_review()))
    assert response["allowed"] is True
    if not isinstance(body, bytes):
        with pytest.raises(ValueError):
            admit(body)


# ---- metrics, health, and admit == the server ---------------------------------------------------


async def test_healthz_and_metrics(webhook: Webhook) -> None:
    async with webhook.client.get(f"{webhook.url}/healthz") as resp:
        assert (resp.status, await resp.text()) == (200, "ok")
    obj = example("modelserver.yaml")
    await webhook.review(review_for(obj))
    _bad_enum(obj)
    await webhook.review(review_for(obj))
    await webhook.review(review_for(obj))
    async with webhook.client.get(f"{webhook.url}/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    samples = {
        (s.labels["kind"], s.labels["operation"], s.labels["allowed"]): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "infergate_webhook_admissions_total"
    }
    assert samples == {("ModelServer", "CREATE", "true"): 1, ("ModelServer", "CREATE", "false"): 2}


async def test_admit_answers_as_the_server_does(webhook: Webhook) -> None:
    reviews = [review_for(yaml.safe_load(p.read_text())) for p in EXAMPLE_FILES]
    for file, breakage, _ in BROKEN:
        obj = example(file)
        breakage(obj)
        reviews.append(review_for(obj))
    route = example("modelroute.yaml")
    renamed = copy.deepcopy(route)
    renamed["spec"]["modelName"] = "other"
    reviews.append(review_for(renamed, route))
    reviews.append(review_for(route, operation="DELETE"))
    reviews.append(review_for({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {}}))
    for review in reviews:
        before = copy.deepcopy(review)
        assert admit(review) == await webhook.review(review)
        assert review == before  # admit changes nothing it is given


# ---- what the controllers expand: nulls and pod templates ---------------------------------------


def _sim_template() -> Obj:
    return {
        "metadata": {"labels": {"app": "llm"}},
        "spec": {
            "containers": [
                {
                    "name": "engine",
                    "env": [
                        {"name": "N", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
                    ],
                    "ports": [{"name": "http", "containerPort": 8000}],
                    "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}},
                }
            ]
        },
    }


async def test_explicit_nulls_read_as_unset_and_the_object_reconciles() -> None:
    """As the API server drops a null in a non-nullable field before defaulting: admitted, and
    the reconcile sees the defaults (it used to reach int(None))."""
    obj = example("modelinfer.yaml")
    obj["spec"]["replicas"] = None
    obj["spec"]["recoveryPolicy"] = None
    obj["spec"]["rolloutStrategy"]["rollingUpdateConfiguration"] = None
    role = obj["spec"]["template"]["roles"][0]
    role["replicas"] = None
    role["workerTemplate"] = None
    role["entryTemplate"]["metadata"] = None
    assert response_of(admit(review_for(obj)))["allowed"] is True

    store = MemoryStore()
    await store.create(obj)
    stored = await store.get(MODEL_INFER, "default", obj["metadata"]["name"])
    assert "replicas" not in stored["spec"] and "metadata" not in role_of(stored)["entryTemplate"]
    await ModelInferReconciler(store).reconcile("default", obj["metadata"]["name"])
    pods, _ = await store.list(POD, "default")
    assert len(pods) == 2  # one group (the default), a prefill and a decode pod


def role_of(mi: Obj) -> Obj:
    return mi["spec"]["template"]["roles"][0]


TEMPLATE_BREAKAGES: list[tuple[str, Any, str]] = [
    (
        "metadata.labels",
        [1],
        "entryTemplate.metadata.labels: Expected `object | null`, got `array`",
    ),
    (
        "metadata.labels",
        {"app": 3},
        "entryTemplate.metadata.labels[...]: Expected `str`, got `int`",
    ),
    ("spec.containers", None, "entryTemplate.spec.containers: Expected `array`, got `null`"),
    ("spec.containers", [], "entryTemplate.spec.containers: must have 1..32 containers"),
    ("spec.containers.0.name", None, "entryTemplate.spec.containers[0].name: Expected `str`"),
    ("spec.containers.0.ports.0.containerPort", "http", "containerPort: Expected `int`"),
    ("spec.containers.0.ports.0.containerPort", 70000, "containerPort: must be 1..65535"),
    (
        "spec.containers.0.env.0.valueFrom",
        [1],
        "env[0].valueFrom: Expected `object | null`, got `array`",
    ),
    ("spec.containers.0.env.0.valueFrom.fieldRef.fieldPath", "spec.nodeName", "must be one of"),
    ("spec.containers.0.readinessProbe.httpGet.port", "grpc", "names no port of the container"),
    ("spec.containers.0.args", ["--port", 8000], "args[1]: Expected `str`, got `int`"),
    ("spec.restartPolicy", "Sometimes", "spec.restartPolicy: must be one of Always"),
    ("spec.terminationGracePeriodSeconds", -1, "terminationGracePeriodSeconds: must be at least"),
]


def _set(obj: Any, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        obj = obj[int(part)] if isinstance(obj, list) else obj[part]
    if isinstance(obj, list):
        obj[int(last)] = value
    else:
        obj[last] = value


@pytest.mark.parametrize(("where", "value", "expected"), TEMPLATE_BREAKAGES)
def test_a_pod_template_the_controllers_cannot_expand_is_refused_naming_the_field(
    where: str, value: Any, expected: str
) -> None:
    obj = example("modelinfer.yaml")
    role_of(obj)["entryTemplate"] = _sim_template()
    assert response_of(admit(review_for(obj)))["allowed"] is True
    _set(role_of(obj)["entryTemplate"], where, value)
    status = response_of(admit(review_for(obj)))["status"]
    assert status["code"] == 422, status
    assert "spec.template.roles[0].entryTemplate" in status["message"]
    assert expected in status["message"], status["message"]


# ---- power over the node: only where the namespace opts in ---------------------------------------

POWERS: list[tuple[str, Any, str]] = [
    ("spec.hostNetwork", True, "spec.hostNetwork: shares the node's network"),
    ("spec.hostPID", True, "spec.hostPID: shares the node's processes"),
    ("spec.hostIPC", True, "spec.hostIPC: shares the node's IPC"),
    ("spec.volumes", [{"name": "root", "hostPath": {"path": "/"}}], "volumes[0].hostPath"),
    ("spec.containers.0.securityContext", {"privileged": True}, "privileged: is privileged"),
    (
        "spec.containers.0.securityContext",
        {"capabilities": {"add": ["SYS_ADMIN"]}},
        "capabilities.add: adds SYS_ADMIN",
    ),
    (
        "spec.initContainers",
        [{"name": "init", "securityContext": {"privileged": True}}],
        "initContainers[0].securityContext.privileged",
    ),
]


def _powerful(where: str, value: Any, namespace: str) -> Obj:
    obj = example("modelinfer.yaml")
    obj["metadata"]["namespace"] = namespace
    _set(role_of(obj)["entryTemplate"], where, value)
    return obj


async def _labels_of(namespace: str) -> dict[str, str] | None:
    if namespace == "unreadable":
        raise ConnectionError("the API server is away")
    labels = {"gpu-admins": {ALLOW_PRIVILEGED_LABEL: "true"}, "plain": {"team": "a"}}
    return labels.get(namespace)


@pytest.fixture
async def namespaced_webhook(tmp_path: Path) -> AsyncIterator[Webhook]:
    cert_dir = webhook_cert().write(tmp_path / "certs")
    metrics = WebhookMetrics()
    async with serving(cert_dir, metrics=metrics, namespace_labels=_labels_of) as url:
        connector = aiohttp.TCPConnector(ssl=trusting(cert_dir / "ca.crt"))
        async with aiohttp.ClientSession(connector=connector) as client:
            yield Webhook(url, client, metrics)


@pytest.mark.parametrize(("where", "value", "expected"), POWERS)
async def test_host_powers_are_refused_unless_the_namespace_opts_in(
    namespaced_webhook: Webhook, where: str, value: Any, expected: str
) -> None:
    for namespace in ("plain", "missing", "unreadable"):
        review = review_for(_powerful(where, value, namespace))
        status = response_of(await namespaced_webhook.review(review))["status"]
        assert status["code"] == 422, (namespace, status)
        assert expected in status["message"], status["message"]
        assert f"{ALLOW_PRIVILEGED_LABEL}=true" in status["message"]
    review = review_for(_powerful(where, value, "gpu-admins"))
    assert response_of(await namespaced_webhook.review(review))["allowed"] is True
    # the pure decision, as standalone mode and a webhook without namespaces take it: refused
    assert response_of(admit(review))["allowed"] is False


# ---- TLS ----------------------------------------------------------------------------------------


async def test_without_a_cert_dir_it_serves_a_certificate_of_its_own() -> None:
    async with serving(None) as url:
        async with aiohttp.ClientSession() as client:
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await client.get(f"{url}/healthz")
            async with client.get(f"{url}/healthz", ssl=False) as resp:
                assert await resp.text() == "ok"


async def test_a_renewed_certificate_is_picked_up(tmp_path: Path) -> None:
    cert_dir = webhook_cert().write(tmp_path / "certs")
    first_ca = tmp_path / "first-ca.crt"
    first_ca.write_bytes((cert_dir / "ca.crt").read_bytes())
    async with serving(cert_dir, reload_interval=0.02) as url:
        renewed = webhook_cert()
        renewed.write(cert_dir)
        new_ca = trusting(cert_dir / "ca.crt")
        for _ in range(100):
            await asyncio.sleep(0.02)
            connector = aiohttp.TCPConnector(ssl=new_ca, force_close=True)
            async with aiohttp.ClientSession(connector=connector) as client:
                with contextlib.suppress(aiohttp.ClientConnectorCertificateError):
                    async with client.get(f"{url}/healthz") as resp:
                        assert await resp.text() == "ok"
                        break
        else:
            pytest.fail("the renewed certificate was not served")
        connector = aiohttp.TCPConnector(ssl=trusting(first_ca), force_close=True)
        async with aiohttp.ClientSession(connector=connector) as client:
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await client.get(f"{url}/healthz")


def test_a_cert_dir_without_the_files_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"tls\.crt or tls\.key"):
        asyncio.run(serve_webhook("127.0.0.1", free_port(), tmp_path))


# ---- the manifest agrees with the CRDs and the server -------------------------------------------


def test_the_webhook_manifest_covers_our_kinds_through_the_service() -> None:
    docs = list(yaml.safe_load_all((ROOT / "gateway-manifests" / "webhook.yaml").read_text()))
    [config] = [d for d in docs if d["kind"] == "ValidatingWebhookConfiguration"]
    [service] = [d for d in docs if d["kind"] == "Service"]
    assert config["apiVersion"] == "admissionregistration.k8s.io/v1"
    assert config["metadata"]["name"] == "infergate-validation"
    assert config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"]
    [hook] = config["webhooks"]
    assert hook["admissionReviewVersions"] == ["v1"]
    assert (hook["sideEffects"], hook["failurePolicy"], hook["timeoutSeconds"]) == (
        "None",
        "Fail",
        5,
    )
    ref = hook["clientConfig"]["service"]
    assert ref == {
        "name": service["metadata"]["name"],
        "namespace": service["metadata"]["namespace"],
        "port": 443,
        "path": "/validate",
    }
    assert (ref["name"], ref["namespace"]) == ("infergate-controllers", "infergate-system")
    assert [p["port"] for p in service["spec"]["ports"]] == [443]
    served = f"{ref['name']}.{ref['namespace']}.svc"
    assert served in SERVICE_NAMES

    covered = set()
    for rule in hook["rules"]:
        assert set(rule["operations"]) == {"CREATE", "UPDATE"}
        covered |= {
            (g, v, r)
            for g in rule["apiGroups"]
            for v in rule["apiVersions"]
            for r in rule["resources"]
        }
    ours = set()
    for path in CRDS.glob("*.yaml"):  # our six CRDs; crds/upstream/ is not ours to validate
        if path.name == "kustomization.yaml":  # kustomize's list of them
            continue
        spec = yaml.safe_load(path.read_text())["spec"]
        ours |= {(spec["group"], v["name"], spec["names"]["plural"]) for v in spec["versions"]}
    assert len(ours) == 6
    assert covered == ours
