"""An example directory (examples/quickstart, examples/pd, examples/two-models, …): the objects
the standalone controllers apply — one `Model` or several, and whatever else they need — the
pickers' `EndpointPickerConfig` beside them and, for Envoy, optionally an Envoy Gateway
`SecurityPolicy` with the `Secret`s holding its API keys, and a `LocalObjectStore` (a local
S3 the stack starts and fills before the controllers: stack/object_store.py). `infergate up
DIR` runs one; with several Models, one Envoy serves them all through the body-based router."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from infergw.api import ApiError, from_dict, yaml_files
from infergw.api.engine_keys import EngineHashSettings, NotReproducible, engine_hash_settings
from infergw.api.engines import runs_simulator
from infergw.api.names import LOCAL_OBJECT_STORE_KIND
from infergw.api.workload import DEFAULT_ENGINE
from infergw.stack.auth import AuthConfig, AuthError
from infergw.stack.model_tokenizer import TokenizerSource
from infergw.stack.object_store import ObjectStoreError, ObjectStoreSpec
from infergw.stack.resources import FILE_URI_ROOT


class ExampleError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class ExampleModel:
    """One Model of an example, as the stack needs it: its pool, the name it serves, its
    tokenizer, its engine and its pods."""

    model: dict

    @property
    def pool_name(self) -> str:
        """Model → InferencePool of the same name (controllers/model_objects.py)."""
        return self.model["metadata"]["name"]

    @property
    def served_name(self) -> str:
        return self.model["spec"].get("servedModelName") or self.pool_name

    @property
    def tokenizer_dir(self) -> Path | None:
        """Where a file:// model lives; relative paths start at FILE_URI_ROOT (the project
        root in a checkout), where `infergate up` runs the controllers."""
        scheme, _, path = self.model["spec"]["modelURI"].partition("://")
        return (FILE_URI_ROOT / path).resolve() if scheme == "file" else None

    @property
    def tokenizer_source(self) -> TokenizerSource | None:
        """Where the picker's tokenizer is fetched from: the source of downloaded weights."""
        return TokenizerSource.of(self.model)

    @property
    def runs_simulator(self) -> bool:
        """Whether the Model's pods run the simulator (else a real engine, which takes
        longer to start)."""
        spec = self.model["spec"]
        engine = (spec.get("engine") or {}).get("type") or DEFAULT_ENGINE
        return runs_simulator(engine, str(spec.get("image") or ""))

    @property
    def engine_hashing(self) -> EngineHashSettings | NotReproducible:
        """How its pods hash blocks, for pickers keyed by engine hashes (api/engine_keys.py)."""
        try:
            model = from_dict(self.model)
        except ApiError as exc:  # the controllers refuse it too, saying so in their log
            return NotReproducible(f"the Model cannot be read: {exc}")
        return engine_hash_settings(model)  # type: ignore[arg-type]

    @property
    def scales_to_zero(self) -> bool:
        """`autoscaling.minReplicas: 0`: idle, the Model has no pod (and may be on its way
        there when the stack starts), so the stack waits for none."""
        scaling = self.model["spec"].get("autoscaling") or {}
        return scaling.get("minReplicas") == 0

    def pods_to_wait_for(self) -> int:
        return 0 if self.scales_to_zero else self.pod_count()

    def pod_count(self) -> int:
        """Pods the Model runs: groups × Σ roles' replicas × (entry + workers)."""
        spec = self.model["spec"]
        backend = spec["backend"]
        roles = (
            [backend["aggregated"]]
            if "aggregated" in backend
            else [
                backend["prefill"],
                backend["decode"],
            ]
        )
        per_group = sum(
            int(r.get("replicas", 1)) * (1 + int(r.get("workerReplicas", 0))) for r in roles
        )
        return int(spec.get("replicas", 1)) * per_group


@dataclass(slots=True)
class Example:
    directory: Path
    documents: dict[Path, list[dict]]  # every YAML file and its documents
    models: list[dict]  # in file order; the first is `model`
    picker_config: Path | None
    auth: AuthConfig | None = None  # from its SecurityPolicy and Secrets, if it has them
    # Local S3 servers the stack starts (and fills) before the controllers.
    object_stores: list[ObjectStoreSpec] = field(default_factory=list)

    @classmethod
    def read(cls, directory: Path) -> Example:
        if not directory.is_dir():
            raise ExampleError(f"{directory} is not a directory")
        documents: dict[Path, list[dict]] = {}
        for path in sorted(directory.glob("*.y*ml")):
            try:
                text = yaml_files.read_text(path)
                documents[path] = [d for d in yaml_files.safe_load_all(text) if d]
            except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
                raise ExampleError(f"{path}: not readable YAML: {exc}") from exc
        models = [d for docs in documents.values() for d in docs if d.get("kind") == "Model"]
        if not models:
            raise ExampleError(f"{directory} holds no Model")
        names = [(m.get("metadata") or {}).get("name") for m in models]
        if len(set(names)) != len(names):
            raise ExampleError(f"{directory}: two Models share a name ({names})")
        configs = [p for p, docs in documents.items() if _has(docs, "EndpointPickerConfig")]
        if len(configs) > 1:
            raise ExampleError(f"{directory} has more than one EndpointPickerConfig")
        try:
            auth = AuthConfig.from_objects(
                (d for docs in documents.values() for d in docs), str(directory)
            )
        except AuthError as exc:
            raise ExampleError(str(exc)) from None
        try:
            stores = [
                ObjectStoreSpec.parse(d, FILE_URI_ROOT)
                for docs in documents.values()
                for d in docs
                if d.get("kind") == LOCAL_OBJECT_STORE_KIND
            ]
        except ObjectStoreError as exc:
            raise ExampleError(f"{directory}: {exc}") from None
        config = configs[0] if configs else None
        return cls(directory, documents, models, config, auth, stores)

    @property
    def model(self) -> dict:
        """The Model (the first, when there are several)."""
        return self.models[0]

    @property
    def each(self) -> list[ExampleModel]:
        return [ExampleModel(m) for m in self.models]

    @property
    def several(self) -> bool:
        """More than one Model: one Envoy serves them through the body-based router."""
        return len(self.models) > 1

    @property
    def pool_name(self) -> str:
        return self.each[0].pool_name

    @property
    def served_name(self) -> str:
        return self.each[0].served_name

    @property
    def tokenizer_dir(self) -> Path | None:
        return self.each[0].tokenizer_dir

    @property
    def runs_simulator(self) -> bool:
        """Whether every Model runs the simulator."""
        return all(m.runs_simulator for m in self.each)

    def pod_count(self) -> int:
        """Every Model's pods."""
        return sum(m.pod_count() for m in self.each)

    def pods_to_wait_for(self) -> int:
        """The pods the stack waits for: none of a Model that scales to zero."""
        return sum(m.pods_to_wait_for() for m in self.each)

    def with_changes(
        self,
        into: Path,
        *,
        replicas: int | None = None,
        engine_args: list[str] = (),
        object_store: str | None = None,
    ) -> Example:
        """A copy of the example in `into`, its Models with these replicas and extra engine
        arguments and, with `object_store` (http://127.0.0.1:PORT), its local S3 moved
        there — the store's endpoint and the Models' env values that named it; the copy is
        what the controllers then watch."""
        into.mkdir(parents=True, exist_ok=True)
        moved = _moved_endpoints(self.object_stores, object_store)
        changed = {id(m): _changed(m, replicas, engine_args, moved) for m in self.models}
        for docs in self.documents.values():
            for d in docs:
                if d.get("kind") == LOCAL_OBJECT_STORE_KIND and moved:
                    changed[id(d)] = _store_moved(d, moved)
        documents = {}
        for path, docs in self.documents.items():
            docs = [changed.get(id(d), d) for d in docs]
            documents[into / path.name] = docs
            (into / path.name).write_text(yaml.safe_dump_all(docs, sort_keys=False))
        config = into / self.picker_config.name if self.picker_config else None
        models = [changed[id(m)] for m in self.models]
        stores = [
            ObjectStoreSpec(s.name, moved.get(s.endpoint, s.endpoint), s.bucket, s.uploads)
            for s in self.object_stores
        ]
        return Example(into, documents, models, config, self.auth, stores)


def _moved_endpoints(stores: list[ObjectStoreSpec], to: str | None) -> dict[str, str]:
    if to is None:
        return {}
    if len(stores) != 1:
        raise ExampleError(f"moving the local S3 needs one LocalObjectStore, not {len(stores)}")
    return {stores[0].endpoint: to.rstrip("/")}


def _store_moved(doc: dict, moved: dict[str, str]) -> dict:
    doc = copy.deepcopy(doc)
    endpoint = str(doc["spec"]["endpoint"]).rstrip("/")
    doc["spec"]["endpoint"] = moved.get(endpoint, endpoint)
    return doc


def _changed(
    model: dict, replicas: int | None, engine_args: list[str], moved: dict[str, str]
) -> dict:
    model = copy.deepcopy(model)
    if replicas is not None:
        model["spec"]["replicas"] = replicas
    if engine_args:
        engine = model["spec"].setdefault("engine", {})
        engine["args"] = [*(engine.get("args") or []), *engine_args]
    for env in model["spec"].get("env") or []:
        value = env.get("value")
        if isinstance(value, str) and value.rstrip("/") in moved:
            env["value"] = moved[value.rstrip("/")]
    return model


def _has(docs: list[dict], kind: str) -> bool:
    return any(d.get("kind") == kind for d in docs)
