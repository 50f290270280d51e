"""The Model reconciler: keep the objects a Model expands into (model_objects.py and, in a
cluster, its endpoint picker and HTTPRoute: picker_objects.py) equal to what the Model says,
and report in status whether they exist (Initialized), whether every serving group is ready
(Active), what needs a person (Failed), Ready, the three together, and in a cluster whether
its Gateway serves it (Reachable: reachability.py).

Edits propagate by comparing each owned object's spec with the desired one. The ModelInfer's
replica count is the Model's only until an autoscaler owns it: with `autoscaling` set, the
binding's target scale is left to the autoscaler after creation. Deleting the Model deletes
everything it made through owner references (the API server's garbage collector, or the
standalone store's).
"""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass

import msgspec

from infergw import api
from infergw.api import Condition, Model, ModelInfer
from infergw.api.engine_keys import ENGINE_KEYS
from infergw.api.meta import ApiStruct
from infergw.api.names import DOWNLOAD_FAILED, ENGINE_NOT_INSTALLED, PICKER_FILTER_POLICY
from infergw.api.workload import ModelInferStatus
from infergw.cluster.store import (
    DEPLOYMENT,
    ENVOY_PATCH_POLICY,
    HTTP_ROUTE,
    KINDS,
    MODEL,
    MODEL_INFER,
    SECRET,
    AlreadyExists,
    Invalid,
    NotFound,
    Obj,
    Store,
    StoreError,
    controller_of,
)
from infergw.controllers import adapters, model_objects, picker_objects, picker_tls
from infergw.controllers.adapter_status import ADAPTERS_LOADED, RECHECK_SECONDS, adapters_loaded
from infergw.controllers.conditions import condition
from infergw.controllers.engine_command import PER_POD, KVEventSockets
from infergw.controllers.events import (
    NO_EVENTS,
    NORMAL,
    WARNING,
    Recorder,
    condition_events,
    object_ref,
)
from infergw.controllers.picker_objects import PickerSettings, PickerTLS
from infergw.controllers.reachability import REACHABLE, Patch, reachable
from infergw.controllers.route_parents import read_route_parents
from infergw.controllers.weights import CLUSTER, WeightsLayout

log = logging.getLogger("controllers.model")
NOT_OURS_RETRY = 30.0  # seconds between looks at an object in the way
TLS_CHECK_INTERVAL = 3600.0  # seconds between looks at a picker certificate's age
IDENTITY_FIELDS = ("apiVersion", "kind", "metadata", "status")
# With --picker-kv-index-keys engine: whether the picker hashes as the Model's engines do.
ENGINE_KEYS_CONDITION = "EngineKeys"
NOT_REPRODUCIBLE = "EngineHashingNotReproducible"
# Condition reasons that need a person: their Events are Warnings.
MODEL_WARNINGS = frozenset(
    ("ObjectNotOwned", "ObjectRejected", "KindNotInstalled", "PodsFailed", "PodsFailing",
     ENGINE_NOT_INSTALLED, DOWNLOAD_FAILED, "NotReachable", "AdaptersNotLoaded",
     NOT_REPRODUCIBLE)
)  # fmt: skip


def covers(have, want) -> bool:
    """`have` holds everything `want` says: equal values, with extra keys in objects (the
    API server's defaults) allowed, at any depth; lists item by item."""
    if isinstance(want, dict):
        return isinstance(have, dict) and all(
            k in have and covers(have[k], v) for k, v in want.items()
        )
    if isinstance(want, list):
        return (
            isinstance(have, list)
            and len(have) == len(want)
            and all(covers(h, w) for h, w in zip(have, want, strict=True))
        )
    return have == want


def _with_role_sizes(want: ModelInfer, have: ModelInfer) -> ModelInfer:
    """`want` with the group count and each role's replicas as `have` has them."""
    sizes = {r.name: r.replicas for r in have.spec.template.roles}
    roles = [
        msgspec.structs.replace(r, replicas=sizes[r.name]) if sizes.get(r.name) is not None else r
        for r in want.spec.template.roles
    ]
    spec = msgspec.structs.replace(
        want.spec,
        replicas=want.spec.replicas if have.spec.replicas is None else have.spec.replicas,
        template=msgspec.structs.replace(want.spec.template, roles=roles),
    )
    return msgspec.structs.replace(want, spec=spec)


class ModelReconciler:
    kind = MODEL

    def __init__(
        self,
        store: Store,
        sockets: KVEventSockets = PER_POD,
        picker: PickerSettings | None = None,
        weights: WeightsLayout = CLUSTER,
        events: Recorder = NO_EVENTS,
    ) -> None:
        self.store = store
        self.events = events
        self.sockets = sockets  # where the engines it writes send KV events
        self.weights = weights  # where the downloads before the engines put the weights
        # In a cluster: each Model's endpoint picker and HTTPRoute, and its Reachable
        # condition. Standalone mode (None) runs one picker and Envoy of its own.
        self.picker = picker

    async def _desired(self, model: Model, tls: PickerTLS | None) -> list[ApiStruct]:
        wants = model_objects.desired(model, self.sockets, self.weights)
        if self.picker is not None:
            model_objects.pass_trace_env(wants, self.picker.trace_env)
            # The Gateways of the ModelRoutes that target this Model (route_parents.py).
            parents = await read_route_parents(self.store, model, model_objects.model_label(model))
            wants += picker_objects.desired(model, self.picker, self.sockets, tls, parents)
        return wants

    async def _picker_tls(self, model: Model) -> tuple[PickerTLS | None, Problem | None]:
        """The picker's Secret: made, or replaced when picker_tls.renewal_problem says so;
        left alone (a Problem) if it is not the Model's."""
        name, ns = picker_objects.tls_secret(model), model.metadata.namespace or "default"
        picker = picker_objects.picker_name(model)
        have = await self.store.get(SECRET, ns, name)
        if have is not None:
            owner = controller_of(have)
            if owner is None or owner.get("uid") != model.metadata.uid:
                return None, Problem("ObjectNotOwned", f"Secret {name} is not this Model's")
            why = picker_tls.renewal_problem(have, ns, picker)
            if why is None:
                stored = picker_tls.stored_cert(have)
                assert stored is not None  # renewal_problem read it
                want_labels = picker_objects.tls_secret_meta(model).labels or {}
                labels = have["metadata"].get("labels") or {}
                changed = any(labels.get(k) != v for k, v in want_labels.items())
                if changed:
                    have["metadata"]["labels"] = {**labels, **want_labels}
                if picker_tls.stored_response_id_key(have) is None:  # made before there was one
                    key = base64.b64encode(picker_tls.new_response_id_key()).decode()
                    have["data"][picker_tls.RESPONSE_ID_KEY] = key
                    changed = True
                if changed:
                    await self.store.update(have)
                return PickerTLS(stored.ca.decode(), picker_tls.fingerprint(stored.cert)), None
            log.info("model %s: renewing Secret %s: %s", model.metadata.name, name, why)
        cert = picker_tls.issue(ns, picker, have)
        # The key outlives the certificate: clients hold ids made with it.
        key = (picker_tls.stored_response_id_key(have) if have else None) or (
            picker_tls.new_response_id_key()
        )
        want = api.to_dict(picker_objects.tls_secret_object(model, cert, key))
        if have is None:
            await self.store.create(want)  # AlreadyExists: the next pass reads theirs
        else:
            have["data"], have["type"] = want["data"], want["type"]
            await self.store.update(have)  # a Conflict retries the whole pass
        return PickerTLS(cert.ca.decode(), picker_tls.fingerprint(cert.cert)), None

    async def reconcile(self, namespace: str, name: str) -> float | None:
        obj = await self.store.get(MODEL, namespace, name)
        if obj is None:
            return None
        model = api.from_dict_as(Model, obj)  # status is written back on `obj`, as read
        if model.metadata.deletion_timestamp:
            return None
        problems: list[Problem] = []
        tls = None
        if self.picker is not None:
            try:
                tls, problem = await self._picker_tls(model)
            except AlreadyExists:
                tls, problem = None, None
            if problem is not None:
                problems.append(problem)
        if not self.weights.in_pod and adapters.loads_at_run_time(model):
            # standalone: the runtime sidecars' adapters file, which a cluster mounts from
            # the ConfigMap
            if adapters.write_local(model, self.weights):
                log.info("model %s: wrote its adapters file", model.metadata.name)
        for want in await self._desired(model, tls):
            try:
                problem = await self._apply(model, want)
            except Invalid as exc:  # rejected: report it, then let the runner retry
                problem = Problem("ObjectRejected", f"{want.kind} {want.metadata.name}: {exc}", exc)
            if problem is not None:
                problems.append(problem)
        for p in problems:  # each pass that meets one counts into its series
            await self._event(model, WARNING, p.reason, "Apply", p.message)
        loading = await self._write_status(obj, model, problems)
        for p in problems:
            if p.error is not None:
                raise p.error
        # An object in the way that is not ours sends us no event when it goes: look again.
        if problems:
            return NOT_OURS_RETRY
        if loading:  # a sidecar's progress sends no event either
            return RECHECK_SECONDS
        # The picker's certificate ages without an event: look at it again now and then.
        return TLS_CHECK_INTERVAL if self.picker is not None else None

    async def _apply(self, model: Model, want: ApiStruct) -> Problem | None:
        """Create or update one owned object; a Problem if it is not ours to write."""
        kind = KINDS[want.kind]
        m = want.metadata
        try:
            have = await self.store.get(kind, m.namespace, m.name)
            if have is None:
                await self.store.create(api.to_dict(want))
                log.info("model %s: created %s %s", model.metadata.name, kind.kind, m.name)
                await self._event(
                    model, NORMAL, "Created", "Create", f"created {kind.kind} {m.name}"
                )
                return None
        except AlreadyExists:
            return None  # someone was quicker: the next pass checks whose it is
        except NotFound:  # the API server serves no such resource: its CRDs are missing
            return Problem(
                "KindNotInstalled",
                f"{kind.kind} {m.name}: the API server does not serve {kind.api_version} "
                f"{kind.plural} (install its CRDs)",
            )
        owner = controller_of(have)
        if owner is None or owner.get("uid") != model.metadata.uid:
            log.warning(
                "model %s: %s %s exists and is not ours; leaving it alone",
                model.metadata.name, kind.kind, m.name,
            )  # fmt: skip
            whose = f"controlled by {owner['kind']} {owner['name']}" if owner else "no controller"
            return Problem(
                "ObjectNotOwned",
                f"{kind.kind} {m.name} exists and is not this Model's ({whose})",
            )
        if model.spec.autoscaling is not None and isinstance(want, ModelInfer):
            # The autoscaler owns the sizes: the groups, and with a prefill/decode binding
            # each role's replicas.
            want = _with_role_sizes(want, api.from_dict_as(ModelInfer, have))
        # What the object says besides its identity: spec for most kinds, data for a
        # ConfigMap, rules for a Role, roleRef and subjects for a RoleBinding.
        body = {k: v for k, v in api.to_dict(want).items() if k not in IDENTITY_FIELDS}
        labels = {**(have["metadata"].get("labels") or {}), **(m.labels or {})}
        # The API server fills in defaults we do not write: what we want must be there,
        # not be all there is, or every pass would write again.
        if covers(have, body) and have["metadata"].get("labels") == labels:
            return None
        have.update(body)
        have["metadata"]["labels"] = labels
        await self.store.update(have)  # a Conflict retries the whole pass
        log.info("model %s: updated %s %s", model.metadata.name, kind.kind, m.name)
        await self._event(model, NORMAL, "Updated", "Update", f"updated {kind.kind} {m.name}")
        return None

    async def _event(self, model: Model, type_: str, reason: str, action: str, note: str) -> None:
        await self.events.event(object_ref(model), type_, reason, action, note)

    async def _write_status(self, obj: Obj, model: Model, problems: list[Problem]) -> bool:
        """Initialized (the owned objects exist and are ours), Active (every serving group of
        the ModelInfer is ready), Failed (an object that is not ours, a rejected write, or
        failed pods: being recreated, or not with recoveryPolicy None) and Ready, the three
        together; with LoRA adapters, AdaptersLoaded (adapter_status.py). Whether adapters
        are still being loaded somewhere."""
        m = model.metadata
        found = await self.store.get(MODEL_INFER, m.namespace or "default", m.name or "")
        mi = None
        if found is not None and (controller_of(found) or {}).get("uid") == m.uid:
            mi = api.from_dict_as(ModelInfer, found)
        # else a ModelInfer of that name that is not ours says nothing about us
        st = (mi.status if mi is not None else None) or ModelInferStatus()
        want = (mi.spec.replicas if mi is not None else None) or 0
        ready = st.ready_replicas or 0
        init = condition(obj, "Initialized", *_initialized(problems))
        active = condition(obj, "Active", *_active(mi, want, ready))
        failed = condition(obj, "Failed", *_failed(mi, problems))
        conditions = [init, active, failed, condition(obj, "Ready", *_ready(init, active, failed))]
        if self.picker is not None:
            conditions.append(condition(obj, REACHABLE, *await self._reachable(model)))
            if self.picker.kv_index_keys == ENGINE_KEYS:
                conditions.append(condition(obj, ENGINE_KEYS_CONDITION, *self._engine_keys(model)))
        loading = False
        if adapters.loads_at_run_time(model):
            loaded = condition(obj, ADAPTERS_LOADED, *await adapters_loaded(self.store, model))
            conditions.append(loaded)
            loading = loaded["status"] == "False"
        status = {
            "observedGeneration": m.generation or 1,
            "replicas": st.replicas or 0,
            "readyReplicas": ready,
            "conditions": conditions,
        }
        if obj.get("status") == status:
            return loading
        # Ready says what Initialized, Active and Failed say, once
        told = [c for c in conditions if c["type"] not in ("Initialized", "Active", "Failed")]
        await condition_events(self.events, obj, told, MODEL_WARNINGS)
        obj["status"] = status
        try:
            await self.store.update_status(obj)
        except NotFound:
            pass
        return loading

    def _engine_keys(self, model: Model) -> tuple[bool, str, str]:
        """With `--picker-kv-index-keys engine`: whether the Model's picker keys its index by
        the engines' block hashes, or why it keeps token ids (picker_objects.py)."""
        assert self.picker is not None
        problem = picker_objects.engine_keys_problem(model, self.picker)
        if problem is None:
            return True, "EngineKeys", "the picker hashes prompts as the engines hash blocks"
        return False, NOT_REPRODUCIBLE, f"the picker keeps token-id keys: {problem}"

    async def _reachable(self, model: Model) -> tuple[bool, str, str]:
        """The Reachable condition: the route accepted with its refs resolved by the Gateway,
        the patches that run the picker on it applied by Envoy Gateway (where the Model's is
        written: its Gateway in its namespace), the picker Available; objects of those names
        that are not the Model's count as missing."""
        m = model.metadata
        ns = m.namespace or "default"

        async def read(kind, name: str) -> Obj | None:
            try:
                return await self.store.get(kind, ns, name)
            except NotFound:  # the kind is not served (no Gateway API or Envoy Gateway CRDs)
                return None

        async def ours(kind, name: str) -> Obj | None:
            found = await read(kind, name)
            owner = controller_of(found) if found is not None else None
            return found if owner is not None and owner.get("uid") == m.uid else None

        gateway = picker_objects.gateway_of(model)
        route = await ours(HTTP_ROUTE, m.name or "")
        picker = await ours(DEPLOYMENT, picker_objects.picker_name(model))
        patches = []
        if picker_objects.writes_patch(model):
            # the install's, in the Gateway's namespace (here the Model's), then the Model's
            picker_name = picker_objects.picker_name(model)
            patches = [
                Patch(
                    PICKER_FILTER_POLICY,
                    await read(ENVOY_PATCH_POLICY, PICKER_FILTER_POLICY),
                    "PickerFilterMissing",
                ),
                Patch(picker_name, await ours(ENVOY_PATCH_POLICY, picker_name), "PatchMissing"),
            ]
        return reachable(route, gateway, picker, patches)


@dataclass(slots=True, frozen=True)
class Problem:
    """Why an owned object could not be written: a condition reason and message, and the
    error to raise after status is written (None: retrying would not help)."""

    reason: str
    message: str
    error: StoreError | None = None


def _initialized(problems: list[Problem]) -> tuple[bool, str, str]:
    if problems:
        return False, problems[0].reason, "; ".join(p.message for p in problems)
    return True, "ObjectsCreated", "the ModelInfer and the objects routing to it exist"


def _progressing(mi: ModelInfer | None) -> Condition | None:
    """The ModelInfer's Progressing condition, which says why its groups are not ready."""
    conditions = (mi.status.conditions if mi is not None and mi.status else None) or []
    return next((c for c in conditions if c.type == "Progressing"), None)


def _active(mi: ModelInfer | None, want: int, ready: int) -> tuple[bool | None, str, str]:
    if mi is None:
        return False, "ModelInferMissing", "this Model has no ModelInfer"
    observed = mi.status.observed_generation if mi.status else None
    if observed != (mi.metadata.generation or 1):
        return None, "ModelInferPending", "the ModelInfer has not reported its current spec yet"
    if want == 0:
        return False, "ScaledToZero", "0 serving groups wanted"
    if ready >= want:
        return True, "AllGroupsReady", f"{ready}/{want} serving groups ready"
    progressing = _progressing(mi)
    why = progressing.reason if progressing and progressing.status == "True" else None
    detail = f": {progressing.message}" if progressing and why else ""
    return False, why or "GroupsNotReady", f"{ready}/{want} serving groups ready{detail}"


def _failed(mi: ModelInfer | None, problems: list[Problem]) -> tuple[bool, str, str]:
    if problems:
        return True, problems[0].reason, "; ".join(p.message for p in problems)
    progressing = _progressing(mi)
    reason = progressing.reason if progressing else None
    message = progressing.message if progressing else ""
    if reason in ("PodsFailed", ENGINE_NOT_INSTALLED, DOWNLOAD_FAILED):  # nothing recreates them
        return True, reason, message
    if reason in ("RecreatingRoles", "RecreatingGroups"):
        return True, "PodsFailing", message
    return False, "NoFailures", "no failures"


def _ready(init: dict, active: dict, failed: dict) -> tuple[bool | None, str, str]:
    """True when Initialized and Active and not Failed; otherwise the first reason why not."""
    if failed["status"] == "True":
        return False, failed["reason"], failed["message"]
    if init["status"] != "True":
        return False, init["reason"], init["message"]
    if active["status"] != "True":
        ok = None if active["status"] == "Unknown" else False
        return ok, active["reason"], active["message"]
    return True, "GroupsReady", active["message"]
