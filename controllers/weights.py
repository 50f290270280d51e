"""Where a Model's engine reads its weights (and its LoRA adapters'), and what puts them there.

- `hf://`, `s3://`, `obs://`, an `http(s)://` archive (a real engine; the simulator needs no
  weights): an init
  container for the Model's own weights runs `infergate download URI --dest=<models>/base`
  (fetch/download.py) into the weights cache before the engine starts, and the engine is
  pointed at that link. Its LoRA adapters are downloaded the same way at run time, into
  <models>/lora/<name>, by the runtime sidecar (adapters.py). The download gets the Model's
  source settings alone (FETCH_ENV: the token, the endpoint, the AWS credentials, each a
  secretKeyRef where the Model says so). A download that
  fails writes its one-line error as the container's termination message, which the
  ModelInfer's Progressing and the Model's Failed conditions quote (DOWNLOAD_FAILED). The
  Model's `modelRevision` and `modelFiles` become the download's `--revision`, `--include`
  and `--exclude` (source_args; its adapters are downloaded whole, at their main).
- `pvc://CLAIM/PATH` (in a cluster): the claim mounted read-only at PVC_ROOT/CLAIM in the
  engine, which reads PATH in place: nothing to copy. In standalone mode the claim is a
  folder of this machine, `<pvc root>/CLAIM` (`--pvc-root`, default under the state dir),
  and the folder is downloaded as a local one is (copied into the weights cache, once per
  revision of its files' sizes and mtimes): the engine reads the copy, so the claim's folder
  is never written, as a read-only mount guarantees; a missing folder fails the download,
  which the Model's conditions quote (SourceNotFound, naming the folder).
- `file://PATH` and `ms://ORG/NAME`: as written (a path in the image or on this machine; the
  engine's own ModelScope download).

In a cluster the cache is a volume mounted at the same path in the init containers and the
engine (the link names a path in it): an emptyDir by default (the pod's own copy, kept
across its containers' restarts), or, with the controllers' `--weights-cache`, a hostPath or
a claim that the pods of a node share — the download's lock then makes one of them fetch
and the others wait and reuse. The per-pod `models` emptyDir holds the links. Standalone
mode runs the same init containers as processes, with folders of this machine instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from infergw.api.engines import INFERGATE_IMAGE, runs_simulator
from infergw.api.names import FETCH_ENV
from infergw.api.workload import Model, engine_type

# Fetched by `infergate download` before the engine starts (http(s): an archive, unpacked).
DOWNLOADED = ("hf", "s3", "obs", "http", "https")
PVC_ROOT = "/mnt/pvc"  # a claim CLAIM is mounted at PVC_ROOT/CLAIM (the download's default)
POD_MODELS_DIR = "/models"  # the per-pod links, one per artifact
POD_CACHE_DIR = "/var/cache/infergate/models"
CACHE_VOLUME = "weights-cache"
DOWNLOAD_CONTAINER = "weights"  # the Model's (its adapters: the runtime sidecar, adapters.py)
MODELS_VOLUME = "models"
BASE = "base"  # the Model's own weights under the models folder; adapters under lora/<name>
DOWNLOAD_IMAGE = INFERGATE_IMAGE  # `infergate download`
TERMINATION_LOG = "/dev/termination-log"  # where the kubelet reads a container's last word
_SECURITY = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


@dataclass(frozen=True, slots=True)
class WeightsLayout:
    """Where the cache and the links are: volumes at fixed paths in a pod (`cache_volume`
    set), or folders of this machine (standalone: None)."""

    cache_dir: str | None  # None: the download's own default (standalone)
    models_root: str
    cache_volume: dict | None = None  # the cache volume's source, e.g. {"emptyDir": {}}
    image: str = DOWNLOAD_IMAGE
    pvc_root: str | None = None  # standalone: where pvc://CLAIM is, as <pvc_root>/CLAIM
    cache_max_bytes: int | None = None  # standalone: each download then evicts down to it

    @classmethod
    def cluster(
        cls, cache_volume: dict | None = None, image: str = DOWNLOAD_IMAGE
    ) -> WeightsLayout:
        return cls(POD_CACHE_DIR, POD_MODELS_DIR, cache_volume or {"emptyDir": {}}, image)

    @classmethod
    def standalone(
        cls,
        cache_dir: Path | None,
        models_root: Path,
        pvc_root: Path | None = None,
        cache_max_bytes: int | None = None,
    ) -> WeightsLayout:
        root = (pvc_root or models_root.parent / "pvc").resolve()
        cache = str(cache_dir.resolve()) if cache_dir else None
        return cls(
            cache, str(models_root.resolve()), pvc_root=str(root), cache_max_bytes=cache_max_bytes
        )

    @property
    def in_pod(self) -> bool:
        return self.cache_volume is not None

    def models_dir(self, model: Model) -> str:
        """The links' folder: the pod's own, or this machine's per Model."""
        if self.in_pod:
            return self.models_root
        m = model.metadata
        return f"{self.models_root}/{m.namespace or 'default'}/{m.name}"


CLUSTER = WeightsLayout.cluster()


def cache_volume_of(setting: str) -> dict:
    """The controllers' `--weights-cache`: `emptyDir`, `hostPath:/DIR` or `pvc:CLAIM`."""
    kind, _, value = setting.partition(":")
    if kind == "emptyDir" and not value:
        return {"emptyDir": {}}
    if kind == "hostPath" and value.startswith("/"):
        return {"hostPath": {"path": value, "type": "DirectoryOrCreate"}}
    if kind == "pvc" and value:
        return {"persistentVolumeClaim": {"claimName": value}}
    raise ValueError(f"--weights-cache {setting!r}: emptyDir, hostPath:/DIR or pvc:CLAIM")


@dataclass(frozen=True, slots=True)
class Artifact:
    uri: str
    link: str  # under the models folder: BASE, or lora/<adapter>


def artifacts(model: Model) -> list[Artifact]:
    out = [Artifact(model.spec.model_uri, BASE)]
    out += [Artifact(a.artifact_url, f"lora/{a.name}") for a in model.spec.lora_adapters or []]
    return out


def downloads(model: Model, uri: str, layout: WeightsLayout) -> bool:
    """Whether this artifact is downloaded before the engine starts (a claim too, in
    standalone mode: from its folder of this machine)."""
    if runs_simulator(engine_type(model), model.spec.image):
        return False
    scheme = uri.partition("://")[0]
    return scheme in DOWNLOADED or (scheme == "pvc" and not layout.in_pod)


def engine_path(model: Model, artifact: Artifact, layout: WeightsLayout) -> str:
    """What the engine's model flag (or an adapter's name=path) takes for an artifact."""
    scheme, _, rest = artifact.uri.partition("://")
    if downloads(model, artifact.uri, layout):
        return f"{layout.models_dir(model)}/{artifact.link}"
    if scheme == "pvc" and layout.in_pod:
        return f"{PVC_ROOT}/{rest.strip('/')}"
    if scheme in ("hf", "ms", "file"):
        return rest
    return "/models/" + rest.rstrip("/").rsplit("/", 1)[-1]  # nothing brings it here


def _claims(model: Model) -> list[str]:
    """The claims the Model's pvc:// artifacts are on."""
    named = {
        a.uri.partition("://")[2].split("/")[0]
        for a in artifacts(model)
        if a.uri.startswith("pvc://")
    }
    return sorted(named - {""})


def is_download(container: str) -> bool:
    """Whether an init container of this name is ours (its status is the download's)."""
    return container == DOWNLOAD_CONTAINER


def caches(model: Model, layout: WeightsLayout) -> bool:
    """Whether the pod has the weights cache and the links' folder: a real engine whose
    weights are downloaded, or that loads LoRA adapters at run time (whatever their sources
    now: the pod template must not change with them)."""
    if runs_simulator(engine_type(model), model.spec.image):
        return False
    return downloads(model, model.spec.model_uri, layout) or model.spec.lora_adapters is not None


def sidecar_resources() -> dict:
    """What a download (or the runtime sidecar) asks of the node, and may do."""
    return {
        "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
        "securityContext": dict(_SECURITY),
    }


def fetcher(model: Model, layout: WeightsLayout, name: str, command: str, args: list[str]) -> dict:
    """A container of ours that fetches the Model's artifacts (`infergate <command>`): the
    weights cache's folder, and of the Model's env its source settings alone."""
    if layout.cache_dir is not None:
        args = [*args, f"--cache-dir={layout.cache_dir}"]
    if layout.pvc_root is not None and any(a.uri.startswith("pvc://") for a in artifacts(model)):
        args = [*args, f"--pvc-root={layout.pvc_root}"]
    return {
        "name": name,
        "image": layout.image,
        "command": ["infergate", command],
        "args": args,
        "env": [{"name": "HOME", "value": "/tmp"}, *fetch_env(model)],
    }


def writable_mounts(layout: WeightsLayout) -> list[dict]:
    """The cache and the links' folder, for what downloads into them."""
    return [
        {"name": CACHE_VOLUME, "mountPath": layout.cache_dir},
        {"name": MODELS_VOLUME, "mountPath": layout.models_root},
    ]


def source_args(model: Model) -> list[str]:
    """The download's flags for the Model's own weights: the revision and the files chosen
    (unset exclude: the downloader's default; `[]`: nothing left out)."""
    spec = model.spec
    args = [f"--revision={spec.model_revision}"] if spec.model_revision else []
    files = spec.model_files
    if files is not None:
        args += [f"--include={glob}" for glob in files.include or []]
        if files.exclude is not None:
            args += [f"--exclude={glob}" for glob in files.exclude] or ["--no-default-exclude"]
    return args


def init_containers(model: Model, layout: WeightsLayout) -> list[dict]:
    """The download of the Model's own weights, if it needs one."""
    out = []
    for artifact in artifacts(model)[:1]:
        if not downloads(model, artifact.uri, layout):
            continue
        args = [
            artifact.uri,
            f"--dest={layout.models_dir(model)}/{artifact.link}",
            *source_args(model),
        ]
        if layout.cache_max_bytes is not None:
            args.append(f"--cache-max-bytes={layout.cache_max_bytes}")
        container = fetcher(model, layout, DOWNLOAD_CONTAINER, "download", args)
        # The download's last line, if it could not write its termination message.
        container["terminationMessagePolicy"] = "FallbackToLogsOnError"
        if layout.in_pod:
            assert layout.cache_dir is not None
            container["args"].append(f"--termination-log={TERMINATION_LOG}")
            container |= {**sidecar_resources(), "volumeMounts": writable_mounts(layout)}
        out.append(container)
    return out


def engine_mounts(model: Model, layout: WeightsLayout) -> list[dict]:
    """The engine's read-only view of the cache and links, and of the Model's claims."""
    if not layout.in_pod:
        return []
    mounts = []
    if caches(model, layout):
        mounts += [
            {"name": CACHE_VOLUME, "mountPath": layout.cache_dir, "readOnly": True},
            {"name": MODELS_VOLUME, "mountPath": layout.models_root, "readOnly": True},
        ]
    for i, claim in enumerate(_claims(model)):
        mounts.append({"name": f"claim-{i}", "mountPath": f"{PVC_ROOT}/{claim}", "readOnly": True})
    return mounts


def volumes(model: Model, layout: WeightsLayout) -> list[dict]:
    if not layout.in_pod:
        return []
    out = []
    if caches(model, layout):
        assert layout.cache_volume is not None
        out += [
            {"name": CACHE_VOLUME, **layout.cache_volume},
            {"name": MODELS_VOLUME, "emptyDir": {}},
        ]
    for i, claim in enumerate(_claims(model)):
        out.append(
            {"name": f"claim-{i}", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
        )
    return out


def fetch_env(model: Model) -> list[dict]:
    """The FETCH_ENV entries of the Model's env, a secretKeyRef kept a reference."""
    return [
        {
            k: v
            for k, v in (("name", e.name), ("value", e.value), ("valueFrom", e.value_from))
            if v is not None
        }
        for e in model.spec.env or []
        if e.name in FETCH_ENV
    ]
