"""A ModelInfer's pod templates: the parts of core/v1 PodTemplateSpec that infergate reads.

The CRD keeps a template as it was written (x-kubernetes-preserve-unknown-fields), and the
controllers copy it into Pods verbatim; so what they and the standalone runtime read of it is
checked here, with the API server's rules for those fields, before an object is admitted: a
template the controllers cannot expand is refused with its field path, never a crash later.

`host_powers` names what gives a pod power over its node — privileged containers, added
capabilities, hostPath volumes, the host's network, PID or IPC namespace. Whoever may create
a ModelInfer makes the controllers create pods, so the webhook refuses these unless the
namespace opts in with the label ALLOW_PRIVILEGED_LABEL=true.
"""

from __future__ import annotations

from typing import Any

import msgspec

from infergw.api.meta import DNS_LABEL, LABEL_KEY, ApiStruct, Problems, conversion_problem

ALLOW_PRIVILEGED_LABEL = "infergate.io/allow-privileged-pods"
RESTART_POLICIES = ("Always", "OnFailure", "Never")
# The fieldRef paths the standalone runtime fills in (a cluster's kubelet knows more).
FIELD_PATHS = ("metadata.name", "metadata.namespace", "status.podIP")


class TemplateMeta(ApiStruct):
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None


class FieldRef(ApiStruct):
    field_path: str


class EnvVarSource(ApiStruct):
    field_ref: FieldRef | None = None


class EnvVar(ApiStruct):
    name: str
    value: str | None = None
    value_from: EnvVarSource | None = None


class ContainerPort(ApiStruct):
    container_port: int
    name: str | None = None


class HTTPGetAction(ApiStruct):
    port: int | str
    path: str | None = None


class Probe(ApiStruct):
    http_get: HTTPGetAction | None = None


class Capabilities(ApiStruct):
    add: list[str] | None = None
    drop: list[str] | None = None


class SleepAction(ApiStruct):
    seconds: int


class LifecycleHandler(ApiStruct):
    sleep: SleepAction | None = None


class Lifecycle(ApiStruct):
    pre_stop: LifecycleHandler | None = None


class SecurityContext(ApiStruct):
    privileged: bool | None = None
    capabilities: Capabilities | None = None


class Container(ApiStruct):
    name: str
    image: str | None = None
    command: list[str] | None = None
    args: list[str] | None = None
    env: list[EnvVar] | None = None
    ports: list[ContainerPort] | None = None
    readiness_probe: Probe | None = None
    lifecycle: Lifecycle | None = None
    security_context: SecurityContext | None = None


class Volume(ApiStruct):
    name: str
    host_path: dict[str, Any] | None = None


class PodSpec(ApiStruct):
    containers: list[Container]
    init_containers: list[Container] | None = None
    volumes: list[Volume] | None = None
    host_network: bool | None = None
    host_pid: bool | None = msgspec.field(name="hostPID", default=None)
    host_ipc: bool | None = msgspec.field(name="hostIPC", default=None)
    restart_policy: str | None = None
    termination_grace_period_seconds: int | None = None
    scheduler_name: str | None = None


class PodTemplate(ApiStruct):
    metadata: TemplateMeta | None = None
    spec: PodSpec | None = None


def read_template(p: Problems, path: str, template: dict[str, Any]) -> PodTemplate | None:
    """The typed template, or None with the first type error at its path."""
    try:
        return msgspec.convert(template, PodTemplate)
    except msgspec.ValidationError as exc:
        p.messages.append(conversion_problem(exc, path))
        return None


def check_pod_template(p: Problems, path: str, template: dict[str, Any], required: bool) -> None:
    """The API server's rules for the fields infergate reads; `required`: spec must be set."""
    typed = read_template(p, path, template)
    if typed is None:
        return
    if typed.spec is None:
        if required:
            p.add(f"{path}.spec", "is required")
        return
    meta = typed.metadata
    if meta is not None and meta.labels is not None:
        p.labels(f"{path}.metadata.labels", meta.labels, 0, 64)
        for key in meta.labels:
            p.match(f"{path}.metadata.labels[{key}]", key, LABEL_KEY, "a label key")
    spec = typed.spec
    where = f"{path}.spec"
    p.length(f"{where}.containers", spec.containers, 1, 32, "containers")
    containers = [*spec.containers, *(spec.init_containers or [])]
    p.unique(f"{where}.containers", [c.name for c in containers], "container name")
    for i, c in enumerate(spec.containers):
        _check_container(p, f"{where}.containers[{i}]", c)
    for i, c in enumerate(spec.init_containers or []):
        _check_container(p, f"{where}.initContainers[{i}]", c)
    p.choice(f"{where}.restartPolicy", spec.restart_policy, RESTART_POLICIES)
    p.number(f"{where}.terminationGracePeriodSeconds", spec.termination_grace_period_seconds, 0)
    for i, volume in enumerate(spec.volumes or []):
        p.match(f"{where}.volumes[{i}].name", volume.name, DNS_LABEL, "a DNS label")


def _check_container(p: Problems, path: str, c: Container) -> None:
    if not 1 <= len(c.name) <= 63 or not DNS_LABEL.match(c.name):
        p.add(f"{path}.name", "must be a DNS label of at most 63 characters")
    names = []
    for i, port in enumerate(c.ports or []):
        p.number(f"{path}.ports[{i}].containerPort", port.container_port, 1, 65535)
        if port.name is not None:
            names.append(port.name)
    for i, env in enumerate(c.env or []):
        if not env.name:
            p.add(f"{path}.env[{i}].name", "must not be empty")
        ref = env.value_from.field_ref if env.value_from is not None else None
        if ref is not None:
            p.choice(f"{path}.env[{i}].valueFrom.fieldRef.fieldPath", ref.field_path, FIELD_PATHS)
    pre_stop = c.lifecycle.pre_stop if c.lifecycle is not None else None
    if pre_stop is not None and pre_stop.sleep is not None:
        p.number(f"{path}.lifecycle.preStop.sleep.seconds", pre_stop.sleep.seconds, 0)
    probe = c.readiness_probe.http_get if c.readiness_probe is not None else None
    if probe is not None:
        port = probe.port
        if isinstance(port, int):
            p.number(f"{path}.readinessProbe.httpGet.port", port, 1, 65535)
        elif not port.isdigit() and port not in names:
            p.add(
                f"{path}.readinessProbe.httpGet.port", f"names no port of the container: {port!r}"
            )
        elif port.isdigit():
            p.number(f"{path}.readinessProbe.httpGet.port", int(port), 1, 65535)


def host_powers(path: str, template: dict[str, Any]) -> list[str]:
    """Where the template asks for power over the node, as `path: what`."""
    typed = read_template(Problems(), path, template)
    if typed is None or typed.spec is None:
        return []
    spec, where = typed.spec, f"{path}.spec"
    out = [
        f"{where}.{name}: shares the node's {what}"
        for name, what, on in (
            ("hostNetwork", "network", spec.host_network),
            ("hostPID", "processes", spec.host_pid),
            ("hostIPC", "IPC", spec.host_ipc),
        )
        if on
    ]
    for i, volume in enumerate(spec.volumes or []):
        if volume.host_path is not None:
            out.append(f"{where}.volumes[{i}].hostPath: mounts the node's files")
    for part, containers in (
        ("containers", spec.containers),
        ("initContainers", spec.init_containers),
    ):
        for i, c in enumerate(containers or []):
            ctx = c.security_context
            if ctx is None:
                continue
            if ctx.privileged:
                out.append(f"{where}.{part}[{i}].securityContext.privileged: is privileged")
            if ctx.capabilities is not None and ctx.capabilities.add:
                added = ", ".join(ctx.capabilities.add)
                out.append(f"{where}.{part}[{i}].securityContext.capabilities.add: adds {added}")
    return out
