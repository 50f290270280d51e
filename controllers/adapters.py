"""A Model's LoRA adapters, loaded at run time by the runtime sidecar (infergw/runtime) rather
than by engine flags, so that adding or removing one changes no pod template and restarts no
pod.

A Model with `loraAdapters` (even `[]`) gets, in every serving pod (entries: a worker serves
nothing), the engine started with `--enable-lora` (vLLM's engine also with
VLLM_ALLOW_RUNTIME_LORA_UPDATING, which opens its load/unload routes) and beside it the
container RUNTIME_CONTAINER: `infergate runtime`, which reads the adapters wanted from a file,
downloads those that need it into the weights cache and loads them through the engine's API.
Its readiness probe is the pod's: ready once the engine serves every wanted adapter.

The file (runtime/desired.py's document) is the one thing that changes with the adapters: in a
cluster the ConfigMap `<model>-adapters` (key ADAPTERS_FILE), mounted at ADAPTERS_MOUNT — the
kubelet refreshes a mounted ConfigMap in place (within its sync period, about a minute) — and
in standalone mode a file of this machine beside the Model's weight links, written by the
Model reconciler.
"""

from __future__ import annotations

from pathlib import Path

from infergw.api import Model, ObjectMeta
from infergw.api.core import ConfigMap
from infergw.api.lora_adapters import SGLANG_API, VLLM_API, Adapter, document
from infergw.api.names import MODEL_LABEL, RUNTIME_PORT
from infergw.api.object_names import label_value, subdomain
from infergw.api.workload import engine_type
from infergw.cluster.store import owner_reference_of
from infergw.controllers.engine_command import SGLANG_CLI, engine_cli
from infergw.controllers.weights import (
    WeightsLayout,
    artifacts,
    caches,
    downloads,
    engine_path,
    fetcher,
    sidecar_resources,
    writable_mounts,
)

RUNTIME_CONTAINER = "runtime"
ADAPTERS_FILE = "adapters.json"
ADAPTERS_MOUNT = "/etc/infergate/adapters"
ADAPTERS_VOLUME = "adapters"
RUNTIME_LORA_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"


def loads_at_run_time(model: Model) -> bool:
    """Whether the Model's engine gets LoRA and the runtime sidecar: `loraAdapters` is set
    (an empty list too, so that the first adapter restarts nothing)."""
    return model.spec.lora_adapters is not None


def wanted(model: Model, layout: WeightsLayout) -> list[Adapter]:
    """The adapters the sidecar keeps loaded, each with the path the engine loads it from."""
    lora = model.spec.lora_adapters or []
    return [
        Adapter(
            a.name, a.artifact_url, engine_path(model, f, layout), downloads(model, f.uri, layout)
        )
        for a, f in zip(lora, artifacts(model)[1:], strict=True)
    ]


def configmap_name(model: Model) -> str:
    return subdomain(model.metadata.name or "", "-adapters")


def adapters_file(model: Model, layout: WeightsLayout) -> str:
    """Where the sidecar reads the file: the ConfigMap's mount, or this machine's file."""
    if layout.in_pod:
        return f"{ADAPTERS_MOUNT}/{ADAPTERS_FILE}"
    return f"{layout.models_dir(model)}/{ADAPTERS_FILE}"


def configmap(model: Model, layout: WeightsLayout) -> ConfigMap:
    m = model.metadata
    return ConfigMap(
        metadata=ObjectMeta(
            name=configmap_name(model),
            namespace=m.namespace or "default",
            labels={MODEL_LABEL: label_value(m.name or "")},
            owner_references=[owner_reference_of(model)],
        ),
        data={ADAPTERS_FILE: document(wanted(model, layout))},
    )


def write_local(model: Model, layout: WeightsLayout) -> bool:
    """Standalone mode: write the file where the sidecar reads it, whole (a rename), if it
    differs; whether it was written."""
    path = Path(adapters_file(model, layout))
    text = document(wanted(model, layout))
    try:
        if path.read_text() == text:
            return False
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return True


def engine_api(model: Model) -> str:
    """Whose adapter routes the engine serves: SGLang's, else vLLM's (the simulator's too)."""
    cli = engine_cli(engine_type(model), model.spec.image)
    return SGLANG_API if cli is SGLANG_CLI else VLLM_API


def runtime_container(
    model: Model, layout: WeightsLayout, served_name: str, engine_port: int
) -> dict:
    """The sidecar: its engine on the pod's address, the file, the links' folder and cache
    (read-write: it downloads), the Model's source settings, and the pod's readiness."""
    args = [
        f"--engine={engine_api(model)}",
        f"--engine-url=http://$(POD_IP):{engine_port}",
        f"--served-model-name={served_name}",
        f"--adapters-file={adapters_file(model, layout)}",
        f"--models-dir={layout.models_dir(model)}",
        "--host=$(POD_IP)",
        f"--port={RUNTIME_PORT}",
    ]
    container = fetcher(model, layout, RUNTIME_CONTAINER, "runtime", args)
    container |= {
        "ports": [{"name": RUNTIME_CONTAINER, "containerPort": RUNTIME_PORT}],
        "readinessProbe": {
            "httpGet": {"path": "/ready", "port": RUNTIME_CONTAINER},
            "periodSeconds": 2,
        },
    }
    if layout.in_pod:
        mounts = [{"name": ADAPTERS_VOLUME, "mountPath": ADAPTERS_MOUNT, "readOnly": True}]
        if caches(model, layout):
            mounts += writable_mounts(layout)
        container |= {**sidecar_resources(), "volumeMounts": mounts}
    return container


def volumes(model: Model, layout: WeightsLayout) -> list[dict]:
    """The ConfigMap's volume, in a cluster."""
    if not (layout.in_pod and loads_at_run_time(model)):
        return []
    return [{"name": ADAPTERS_VOLUME, "configMap": {"name": configmap_name(model)}}]
