"""The two fleets, both from the project's examples and run by the standalone controllers:

- aggregated: examples/quickstart's Model with 4 replicas (4 pods of role `both`) behind its
  picker config (queue, KV-cache, in-flight and precise prefix scorers);
- disaggregated: examples/pd's Model, 2 groups of 1 prefill + 1 decode pod (the decode pods
  behind the nixl connector sidecar) behind its pd-profile-handler config;
- disaggregated-1-group: the same Model as 1 group of 2 prefill + 2 decode pods, so the
  picker chooses the prefill pod by its own load instead of taking the decode pod's partner.

Both keep their example's engine arguments (the simulator's default latency model unless a
`Tuning` names a profile) but for the KV-event socket, which is this run's free port; no
SecurityPolicy is copied (auth off). A `Tuning` may also change the pd-profile-handler's
parameters (the adaptive threshold's weights).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import yaml

from infergw.api.names import BOTH, DECODE, ROLE_LABEL
from infergw.bench.common import counter_sum
from infergw.epp.scheduling.config import load_config
from infergw.simulator.latency_profiles import DEFAULT_PROFILE
from infergw.stack.example import Example
from infergw.stack.local import LocalStack, StackConfig
from infergw.stack.ports import free_stack_ports
from infergw.stack.resources import EXAMPLES as EXAMPLE_DIRS

EXAMPLES = {
    "aggregated": EXAMPLE_DIRS / "quickstart",
    "disaggregated": EXAMPLE_DIRS / "pd",
    "disaggregated-1-group": EXAMPLE_DIRS / "pd",
}
# (groups, prefill pods a group, decode pods a group): 4 pods in every mode
LAYOUT = {
    "aggregated": (4, 0, 0),
    "disaggregated": (2, 1, 1),
    "disaggregated-1-group": (1, 2, 2),
}
MODES = tuple(EXAMPLES)


@dataclass(frozen=True, slots=True)
class Tuning:
    """What a run changes in the examples: every pod's latency profile, and parameters merged
    into the pd-profile-handler's (ignored by the aggregated mode, which has none)."""

    latency_profile: str = DEFAULT_PROFILE
    pd_params: Mapping[str, object] = field(default_factory=dict)

    def describe(self) -> dict:
        return {"latency_profile": self.latency_profile, "pd_params": dict(self.pd_params)}


def copy_example(mode: str, into: Path, tuning: Tuning | None = None) -> Example:
    """The mode's example Model and picker config in `into`, with the mode's layout. Its
    pods' KV events go where the stack tells the controllers (its picker's port)."""
    tuning = tuning or Tuning()
    into.mkdir(parents=True, exist_ok=True)
    src = EXAMPLES[mode]
    model = next(d for d in yaml.safe_load_all((src / "model.yaml").read_text()) if d)
    groups, prefill, decode = LAYOUT[mode]
    model["spec"]["replicas"] = groups
    if prefill:
        model["spec"]["backend"]["prefill"]["replicas"] = prefill
        model["spec"]["backend"]["decode"]["replicas"] = decode
    engine = model["spec"]["engine"]
    engine["args"] = [*engine["args"], "--log-level=warning"]
    if tuning.latency_profile != DEFAULT_PROFILE:
        engine["args"].append(f"--sim-latency-profile={tuning.latency_profile}")
    (into / "model.yaml").write_text(yaml.safe_dump(model, sort_keys=False))
    config = (src / "epp-config.yaml").read_text()
    if tuning.pd_params:
        config = _with_pd_params(config, tuning.pd_params)
    (into / "epp-config.yaml").write_text(config)
    return Example.read(into)


def check_tuning(tuning: Tuning) -> None:
    """The picker's own check of every tuned picker config, before any fleet starts: a bad
    pd-profile-handler parameter is a ConfigError now, not a picker that never gets ready
    minutes into a run."""
    for src in EXAMPLES.values():
        config = (src / "epp-config.yaml").read_text()
        tuned = _with_pd_params(config, tuning.pd_params)
        if tuned != config:
            load_config(tuned)


def _with_pd_params(config: str, params: Mapping[str, object]) -> str:
    doc = yaml.safe_load(config)
    handlers = [p for p in doc["plugins"] if p["type"] == "pd-profile-handler"]
    if not handlers:
        return config  # aggregated: kept as written
    for plugin in handlers:
        plugin["parameters"] = {**plugin.get("parameters", {}), **params}
    return yaml.safe_dump(doc, sort_keys=False)


def new_stack(mode: str, workdir: Path, tuning: Tuning | None = None) -> LocalStack:
    """Not started: use it as a context manager."""
    ports = free_stack_ports()
    example = copy_example(mode, workdir / "example", tuning)
    cfg = StackConfig.from_example(
        example, workdir / "run", ports, picker_args=["--log-level", "warning"]
    )
    return LocalStack(cfg)


def pods(stack: LocalStack) -> list[dict]:
    """Ready pods from the pool file: role and address (ip:8000)."""
    out = []
    for d in yaml.safe_load_all(stack.pool_path.read_text()):
        if d and d["kind"] == "Pod" and d["status"].get("podIP"):
            role = d["metadata"]["labels"].get(ROLE_LABEL, BOTH)
            out.append({"role": role, "address": f"{d['status']['podIP']}:8000"})
    return out


async def snapshot(stack: LocalStack) -> dict[str, float]:
    """Counters summed over the pods (the engines' step times, by role) and, for the
    disaggregated fleet, the sidecars' fallbacks and errors."""
    out: dict[str, float] = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
        for pod in pods(stack):
            out[f"{pod['role']}_pods"] = out.get(f"{pod['role']}_pods", 0.0) + 1
            async with s.get(f"http://{pod['address']}/metrics") as r:
                text = await r.text()
            for key, name in (
                ("busy", "infergate_sim:step_busy_seconds"),
                ("modeled", "infergate_sim:step_modeled_seconds"),
            ):
                k = f"{pod['role']}_{key}"
                out[k] = out.get(k, 0.0) + counter_sum(text, name)
            if pod["role"] == DECODE:
                async with s.get(f"http://{pod['address']}/connector/metrics") as r:
                    own = await r.text()
                for key, name in (
                    ("fallbacks", "infergate_connector_prefill_fallbacks_total"),
                    ("connector_errors", "infergate_connector_errors_total"),
                    ("prefill_legs", "infergate_connector_prefill_duration_seconds_count"),
                ):
                    out[key] = out.get(key, 0.0) + counter_sum(own, name)
        url = f"http://127.0.0.1:{stack.cfg.ports.picker_metrics}/metrics"
        async with s.get(url) as r:
            text = await r.text()
        for outcome in ("disaggregated", "decode_only", "no_prefill_pod"):
            label = f'{{outcome="{outcome}"}}'
            out[f"pd_{outcome}"] = sum(
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith("infergate_epp_pd_decisions_total" + label)
            )
    return out
