"""The autoscaler: for each AutoScalingPolicyBinding, every `interval` seconds, sum the
policy's metrics over the target's ready pods, let autoscaling.Scaler decide, and write the
target's size — a ModelInfer's replicas (groups) or one role's replicas in its template.

Targets: one (homogeneous), several with costs (heterogeneous: one recommendation for the
total, split cheapest-first), or a prefill and a decode target kept within a ratio. A cycle
in which any target pod failed to answer is skipped (as Kthena does): a missing sample must
not read as zero load.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time

import aiohttp

from infergw.api import ApiError, from_dict, prune_nulls
from infergw.api.autoscaling import AutoScalingPolicy, EffectiveStep, effective_policy
from infergw.api.engines import VLLM_METRICS, metric_name, metrics_path
from infergw.api.names import ENGINE_LABEL, ROLE_LABEL
from infergw.cluster.pool import is_worker, reached_port
from infergw.cluster.store import (
    AUTOSCALING_BINDING,
    AUTOSCALING_POLICY,
    MODEL_INFER,
    POD,
    NotFound,
    Obj,
    Store,
)
from infergw.controllers import autoscaling as a
from infergw.controllers.conditions import condition, find, listed, now_rfc3339
from infergw.controllers.events import NO_EVENTS, NORMAL, Recorder, condition_events
from infergw.controllers.modelinfer_pods import instance_label, pod_ready
from infergw.controllers.picker_demand import PickerDemand
from infergw.controllers.prom_text import parse_sum

log = logging.getLogger("controllers.autoscaler")


# Ready reasons that need a person (or a metrics endpoint back): their Events are Warnings.
BINDING_WARNINGS = frozenset(("PolicyNotFound", "TargetNotFound", "MetricsUnavailable"))
# Seconds between the cycles of a binding with a target at zero replicas.
AT_ZERO_INTERVAL = 1.0


class ScrapeFailed(Exception):
    pass


def policy_from(obj: Obj) -> a.Policy:
    """The arithmetic's policy for an AutoScalingPolicy object, read through the API (which
    fills in the CRD's defaults)."""
    typed = from_dict(prune_nulls(obj))
    if not isinstance(typed, AutoScalingPolicy):
        raise ApiError(f"expected an AutoScalingPolicy, got {typed.kind}")
    p = effective_policy(typed)
    return a.Policy(
        targets={name: float(value) for name, value in p.targets.items()},
        tolerance=p.tolerance_percent / 100,
        up=_step(p.scale_up),
        down=_step(p.scale_down),
        panic=None
        if p.panic is None
        else a.PanicPolicy(
            threshold_percent=float(p.panic.threshold_percent),
            percent=float(p.panic.percent),
            period=p.panic.period,
            hold=p.panic.hold,
        ),
    )


def _step(step: EffectiveStep) -> a.StepPolicy:
    return a.StepPolicy(
        instances=step.instances,
        percent=step.percent,
        period=step.period,
        select=step.select_policy,
        window=step.stabilization_window,
    )


class AutoscalerReconciler:
    kind = AUTOSCALING_BINDING

    def __init__(
        self,
        store: Store,
        *,
        interval: float = 15.0,
        clock=time.monotonic,
        picker_metrics: dict[str, list[str]] | None = None,
        events: Recorder = NO_EVENTS,
    ) -> None:
        """`picker_metrics`: pool → its pickers' metrics URLs (standalone mode); None: found
        through each pool's endpointPickerRef (controllers/picker_demand.py)."""
        self.store = store
        self.events = events
        self.interval = interval
        self.clock = clock
        self.demand = PickerDemand(store, self._get_text, picker_metrics)
        self.scalers: dict[tuple[str, str, str], a.Scaler] = {}
        # per prefillDecode binding, for status: the roles' sizes before and after the ratio
        self.ratios: dict[tuple[str, str], tuple[tuple[int, int], tuple[int, int]]] = {}
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def reconcile(self, namespace: str, name: str) -> float | None:
        binding = await self.store.get(AUTOSCALING_BINDING, namespace, name)
        if binding is None:
            self.scalers = {k: v for k, v in self.scalers.items() if k[:2] != (namespace, name)}
            self.ratios.pop((namespace, name), None)
            return None
        spec = binding["spec"]
        pobj = await self.store.get(AUTOSCALING_POLICY, namespace, spec["policyRef"]["name"])
        if pobj is None:
            problem = f"policy {spec['policyRef']['name']} not found"
            await self._status(binding, None, problem, reason="PolicyNotFound")
            return self.interval
        if missing := await self._missing_targets(binding):
            problem = "; ".join(missing)
            await self._status(binding, None, problem, reason="TargetNotFound", missing=missing)
            return self.interval
        policy = policy_from(pobj)
        try:
            if "homogeneousTarget" in spec:
                results = [await self._one(binding, policy, spec["homogeneousTarget"])]
            elif "heterogeneousTarget" in spec:
                results = await self._several(binding, policy, spec["heterogeneousTarget"])
            else:
                results = await self._prefill_decode(binding, policy, spec["prefillDecode"])
        except ScrapeFailed as exc:
            log.info("binding %s/%s: cycle skipped: %s", namespace, name, exc)
            await self._status(binding, None, f"cycle skipped: {exc}", reason="MetricsUnavailable")
            return self.interval
        for target, _current, desired in results:
            await self._set_size(binding, target["target"], desired)
        await self._status(binding, results, None)
        if any(desired == 0 for _, _, desired in results):
            # At zero only the pickers' demand can move it, and a held request waits for
            # the next cycle: look again soon (it costs a scrape of the pickers only).
            return min(self.interval, AT_ZERO_INTERVAL)
        return self.interval

    # ---- the three binding forms ------------------------------------------------------

    async def _one(self, binding: Obj, policy: a.Policy, t: dict) -> tuple[dict, int, int]:
        current, pods = await self._observe(binding, t["target"])
        metrics = await self._metrics(pods, policy)
        demand = await self._demand(binding, t["target"])
        scaler = self._scaler(binding, t, policy)
        return t, current, scaler.step(self.clock(), metrics, current, demand)

    async def _several(self, binding: Obj, policy: a.Policy, h: dict):
        """One recommendation for the total, split over the targets cheapest-first."""
        current, pods, demand = {}, [], 0.0
        for t in h["targets"]:
            c, p = await self._observe(binding, t["target"])
            current[_key(t["target"])] = c
            pods += p
            # one pool's pickers, whichever target: the largest, not the sum
            demand = max(demand, await self._demand(binding, t["target"]))
        currents = sum(current.values())
        metrics = await self._metrics(pods, policy)
        total_range = {
            "minReplicas": sum(t.get("minReplicas", 1) for t in h["targets"]),
            "maxReplicas": sum(t["maxReplicas"] for t in h["targets"]),
            "target": TOTAL,
        }
        scaler = self._scaler(binding, total_range, policy)
        total = scaler.step(self.clock(), metrics, currents, demand)
        split = a.split_by_cost(
            total,
            [
                a.CostTarget(
                    _key(t["target"]), t.get("minReplicas", 1), t["maxReplicas"], t.get("cost", 1)
                )
                for t in h["targets"]
            ],
            float(h.get("costExpansionRatePercent", 200)),
        )
        return [(t, current[_key(t["target"])], split[_key(t["target"])]) for t in h["targets"]]

    async def _prefill_decode(self, binding: Obj, policy: a.Policy, pd: dict):
        pt, pc, p = await self._one(binding, policy, pd["prefill"])
        dt, dc, d = await self._one(binding, policy, pd["decode"])
        ratio = pd.get("ratio") or {}
        raw = (p, d)
        p, d = a.enforce_ratio(p, d, float(ratio.get("min", 0)), float(ratio.get("max", math.inf)))
        p = min(p, pd["prefill"]["maxReplicas"])
        d = min(d, pd["decode"]["maxReplicas"])
        self.ratios[_binding_key(binding)] = (raw, (p, d))
        return [(pt, pc, p), (dt, dc, d)]

    # ---- reading and writing targets --------------------------------------------------

    def _scaler(self, binding: Obj, t: dict, policy: a.Policy) -> a.Scaler:
        m = binding["metadata"]
        key = (m.get("namespace", "default"), m["name"], _key(t["target"]))
        s = self.scalers.get(key)
        if s is None or s.policy != policy:
            s = self.scalers[key] = a.Scaler(policy)
        s.min_replicas = int(t.get("minReplicas", 1))
        s.max_replicas = int(t["maxReplicas"])
        return s

    async def _observe(self, binding: Obj, target: dict) -> tuple[int, list[Obj]]:
        ns = binding["metadata"].get("namespace", "default")
        mi = await self.store.get(MODEL_INFER, ns, target["name"])
        if mi is None:
            raise ScrapeFailed(f"ModelInfer {target['name']} not found")
        labels = instance_label(target["name"])
        if target.get("role"):
            labels[ROLE_LABEL] = target["role"]
            role = next(r for r in mi["spec"]["template"]["roles"] if r["name"] == target["role"])
            current = int(role.get("replicas", 1))
        else:
            current = int(mi["spec"].get("replicas", 1))
        pods, _ = await self.store.list(POD, ns, labels)
        # a worker pod serves no requests and no metrics: its entry pod speaks for the group
        serving = [p for p in pods if not is_worker(p["metadata"].get("labels") or {})]
        return current, [p for p in serving if pod_ready(p)]

    async def _metrics(self, pods: list[Obj], policy: a.Policy) -> dict[str, float]:
        texts = await asyncio.gather(*(self._scrape(p) for p in pods))
        total = dict.fromkeys(policy.targets, 0.0)
        for pod, text in zip(pods, texts, strict=True):
            engine = _engine(pod)
            names = {m: metric_name(engine, m) for m in policy.targets}
            values = parse_sum(text, set(names.values()))
            for m, n in names.items():
                total[m] += values[n]
        return total

    async def _scrape(self, pod: Obj) -> str:
        ip = (pod.get("status") or {}).get("podIP")
        container = (pod["spec"].get("containers") or [{}])[0]
        port = next((p["containerPort"] for p in container.get("ports") or []), 8000)
        port = reached_port(pod, port)
        path = metrics_path(_engine(pod))
        return await self._get_text(f"http://{ip}:{port}{path}", pod["metadata"]["name"])

    async def _demand(self, binding: Obj, target: dict) -> float:
        """Requests the target's pickers hold for want of a ready pod."""
        ns = binding["metadata"].get("namespace", "default")
        mi = await self.store.get(MODEL_INFER, ns, target["name"])
        return 0.0 if mi is None else await self.demand.waiting(ns, mi)

    async def _get_text(self, url: str, who: str | None = None) -> str:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2))
        try:
            async with self._session.get(url) as resp:
                if resp.status != 200:
                    raise ScrapeFailed(f"{who or url}: answered {resp.status}")
                return await resp.text()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise ScrapeFailed(f"{who or url}: {exc}") from exc

    async def _set_size(self, binding: Obj, target: dict, desired: int) -> None:
        namespace = binding["metadata"].get("namespace", "default")
        mi = await self.store.get(MODEL_INFER, namespace, target["name"])
        if mi is None:
            return
        if target.get("role"):
            role = next(r for r in mi["spec"]["template"]["roles"] if r["name"] == target["role"])
            current = int(role.get("replicas", 1))
            if current == desired:
                return
            role["replicas"] = desired
        else:
            current = int(mi["spec"].get("replicas", 1))
            if current == desired:
                return
            mi["spec"]["replicas"] = desired
        log.info(
            "scaling ModelInfer %s %s to %d", target["name"], target.get("role") or "", desired
        )
        await self.store.update(mi)  # a Conflict retries the pass
        scaler = self.scalers.get((namespace, binding["metadata"]["name"], _key(target)))
        why = f" ({scaler.last.reason})" if scaler is not None and scaler.last else ""
        note = f"{_target_name(target)}: {current} -> {desired} replicas{why}"
        await self.events.event(binding, NORMAL, "SuccessfulRescale", "Scale", note)

    # ---- status ----------------------------------------------------------------------

    async def _status(
        self,
        binding: Obj,
        results,
        problem: str | None,
        *,
        reason: str = "Scaling",
        missing: list[str] | None = None,
    ) -> None:
        """Ready (this cycle read the metrics and sized the targets, else `reason`),
        TargetFound (every target ModelInfer and role exists), RatioConstraintViolated
        (prefillDecode only: the ratio had to be enforced, or maxReplicas keeps it from
        being met) and what was decided per target. `results` None, a cycle that decided
        nothing, keeps the last decisions."""
        m = binding["metadata"]
        old = binding.get("status") or {}
        if missing is None:
            missing = await self._missing_targets(binding)
        targets = (
            list(old.get("targets") or []) if results is None else self._targets(binding, results)
        )
        names = [_target_name(t) for t in _targets_of(binding["spec"])]
        ok = problem is None
        conditions = [
            condition(
                binding,
                "Ready",
                ok,
                "Scaling" if ok else reason,
                problem or "metrics read, targets sized",
            ),
            condition(
                binding,
                "TargetFound",
                not missing,
                "TargetNotFound" if missing else "TargetsFound",
                "; ".join(missing) or f"found {listed(names)}",
            ),
        ]
        if "prefillDecode" in binding["spec"]:
            ratio = (
                find(binding, "RatioConstraintViolated")
                if results is None
                else self._ratio_condition(binding)
            )
            if ratio is not None:
                conditions.append(ratio)
        status = {
            "observedGeneration": m.get("generation", 1),
            "targets": targets,
            "conditions": conditions,
        }
        if binding.get("status") == status:
            return
        await condition_events(self.events, binding, conditions, BINDING_WARNINGS)
        binding["status"] = status
        try:
            await self.store.update_status(binding)
        except NotFound:
            pass

    def _targets(self, binding: Obj, results) -> list[dict]:
        """Per target: current and desired replicas, Stable or Panic, when it last scaled."""
        m = binding["metadata"]
        old = {
            (t.get("name"), t.get("role")): t
            for t in (binding.get("status") or {}).get("targets") or []
        }
        targets = []
        for t, current, desired in results:
            tgt = t["target"]
            ns = m.get("namespace", "default")
            scaler = self.scalers.get((ns, m["name"], _key(tgt)))
            # several targets share one recommendation for their total, split by cost
            shared = scaler is None
            if shared:
                scaler = self.scalers.get((ns, m["name"], _key(TOTAL)))
            entry = {
                "name": tgt["name"],
                "currentReplicas": current,
                "desiredReplicas": desired,
                "mode": "Panic" if scaler and scaler.panicking(self.clock()) else "Stable",
            }
            if scaler is not None and scaler.last is not None:
                entry.update(_decision(scaler.last, desired, shared))
            if tgt.get("role"):
                entry["role"] = tgt["role"]
            prev = old.get((tgt["name"], tgt.get("role")), {})
            changed = desired != current
            entry["lastScaleTime"] = now_rfc3339() if changed else prev.get("lastScaleTime")
            if entry["lastScaleTime"] is None:
                del entry["lastScaleTime"]
            targets.append(entry)
        return targets

    def _ratio_condition(self, binding: Obj) -> dict | None:
        """True when this cycle raised a role to keep prefill/decode within the ratio
        (RatioEnforced) or could not, maxReplicas being in the way (RatioUnsatisfiable)."""
        seen = self.ratios.get(_binding_key(binding))
        if seen is None:
            return None
        (raw_p, raw_d), (p, d) = seen
        pd = binding["spec"]["prefillDecode"]
        ratio = pd.get("ratio") or {}
        low, high = float(ratio.get("min", 0)), float(ratio.get("max", math.inf))
        bounds = f"[{low:g}, {high:g}]"
        # the same tests as autoscaling.enforce_ratio
        within = not (d > 0 and p < d * low) and not (p > d * high)
        if not within:
            ok, reason = True, "RatioUnsatisfiable"
            message = (
                f"prefill {p} / decode {d} is outside {bounds}: maxReplicas "
                f"(prefill {pd['prefill']['maxReplicas']}, decode {pd['decode']['maxReplicas']}) "
                "stops the role that is short"
            )
        elif (raw_p, raw_d) != (p, d):
            ok, reason = True, "RatioEnforced"
            message = (
                f"prefill/decode kept within {bounds}: prefill {raw_p} -> {p}, "
                f"decode {raw_d} -> {d}"
            )
        else:
            ok, reason = False, "WithinRatio"
            message = f"prefill {p} / decode {d} is within {bounds}"
        return condition(binding, "RatioConstraintViolated", ok, reason, message)

    async def _missing_targets(self, binding: Obj) -> list[str]:
        """What the binding names that does not exist: ModelInfers, roles in them."""
        ns = binding["metadata"].get("namespace", "default")
        missing = []
        for t in _targets_of(binding["spec"]):
            mi = await self.store.get(MODEL_INFER, ns, t["name"])
            if mi is None:
                missing.append(f"ModelInfer {t['name']} not found")
            elif t.get("role") and not any(
                r.get("name") == t["role"] for r in mi["spec"].get("template", {}).get("roles", [])
            ):
                missing.append(f"role {t['role']} not found in ModelInfer {t['name']}")
        return missing


TOTAL = {"name": "__total__"}  # the scaler of a heterogeneous binding's total
MAX_METRICS = 16  # metrics reported per target (the CRD's maxItems)


def _decision(d: a.Decision, desired: int, shared: bool) -> dict:
    """A target's status fields for the step that sized it: the metric sums it read, the
    requests the pickers held, the metrics' recommendation, and why this size."""
    reason = d.reason
    if shared:
        reason = "CostSplit"  # the total's size spread cheapest-first
    elif desired != d.desired:
        reason = "Ratio"  # prefill/decode raised to keep the ratio
    metrics = [{"name": k, "value": f"{v:g}"} for k, v in sorted(d.metrics.items())]
    out = {
        "metrics": metrics[:MAX_METRICS],
        "recommendedReplicas": d.recommended,
        "reason": reason,
    }
    if d.demand:
        out["heldRequests"] = f"{d.demand:g}"
    return out


def _targets_of(spec: dict) -> list[dict]:
    """The `target` references of a binding's one form."""
    if "homogeneousTarget" in spec:
        return [spec["homogeneousTarget"]["target"]]
    if "heterogeneousTarget" in spec:
        return [t["target"] for t in spec["heterogeneousTarget"]["targets"]]
    pd = spec.get("prefillDecode") or {}
    return [pd[side]["target"] for side in ("prefill", "decode") if side in pd]


def _target_name(target: dict) -> str:
    role = target.get("role")
    return f"ModelInfer {target['name']}" + (f" role {role}" if role else "")


def _binding_key(binding: Obj) -> tuple[str, str]:
    m = binding["metadata"]
    return m.get("namespace", "default"), m["name"]


def _key(target: dict) -> str:
    return f"{target['name']}/{target.get('role') or ''}"


def _engine(pod: Obj) -> str:
    """The metric vocabulary of a pod's engine (its ENGINE_LABEL)."""
    return (pod["metadata"].get("labels") or {}).get(ENGINE_LABEL, VLLM_METRICS)
