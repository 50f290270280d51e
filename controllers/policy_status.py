"""The status of AutoScalingPolicies, which nothing else writes: `Valid` (the policy reads
and validates through api/ and yields the autoscaler's arithmetic: InvalidPolicy naming the
field when it does not) and `InUse` (the bindings of its namespace that name it, counted in
`status.bindings`: Unused when none does)."""

from __future__ import annotations

from infergw.api import ApiError
from infergw.cluster.store import AUTOSCALING_BINDING, AUTOSCALING_POLICY, Obj, Store
from infergw.controllers.autoscaler import policy_from
from infergw.controllers.conditions import condition, listed
from infergw.controllers.events import NO_EVENTS, Recorder
from infergw.controllers.object_status import spec_problem, write_status

POLICY_WARNINGS = frozenset(("InvalidPolicy",))


class PolicyStatus:
    kind = AUTOSCALING_POLICY

    def __init__(self, store: Store, events: Recorder = NO_EVENTS) -> None:
        self.store, self.events = store, events

    async def reconcile(self, namespace: str, name: str) -> float | None:
        obj = await self.store.get(AUTOSCALING_POLICY, namespace, name)
        if obj is None:
            return None
        problem = spec_problem(obj)
        if problem is None:
            try:
                policy_from(obj)
            except (ApiError, ValueError) as exc:
                problem = str(exc)
        if problem is not None:
            valid = condition(obj, "Valid", False, "InvalidPolicy", problem)
        else:
            valid = condition(obj, "Valid", True, "Valid", "the policy is valid")
        bindings, _ = await self.store.list(AUTOSCALING_BINDING, namespace)
        users = sorted(b["metadata"]["name"] for b in bindings if policy_name(b) == name)
        in_use = condition(
            obj,
            "InUse",
            bool(users),
            "BoundByBindings" if users else "Unused",
            f"used by {len(users)} binding(s): {listed(users)}" if users else "no binding names it",
        )
        await write_status(
            self.store, self.events, obj, [valid, in_use], POLICY_WARNINGS, bindings=len(users)
        )
        return None


def policy_name(binding: Obj) -> str | None:
    ref = (binding.get("spec") or {}).get("policyRef")
    return ref.get("name") if isinstance(ref, dict) else None
