"""What the gateway e2e tests ask for: the served model, the header naming the pod that served,
and picker configs (one built from plugin weights, or any made pinnable to a pod)."""

from __future__ import annotations

import yaml

MODEL = "infergate-sim"
SERVED = "x-gateway-destination-endpoint-served"
PIN = "test-epp-endpoint-selection"


def config(*plugins: tuple[str, float | None]) -> str:
    """An EndpointPickerConfig with these (type, weight) plugins in one profile."""
    lines = [
        "apiVersion: inference.networking.x-k8s.io/v1alpha1",
        "kind: EndpointPickerConfig",
        "plugins:",
    ]
    lines += [f"- type: {t}" for t, _ in plugins]
    lines += ["schedulingProfiles:", "- name: default", "  plugins:"]
    for t, w in plugins:
        lines.append(f"  - pluginRef: {t}" + (f"\n    weight: {w}" if w is not None else ""))
    return "\n".join(lines) + "\n"


def pinnable(config_text: str) -> str:
    """A picker config plus the header-based-testing-filter first in every profile, so a
    test can pin a pod (PIN). Never in a shipped config: any client could pin one."""
    doc = yaml.safe_load(config_text)
    doc["plugins"].insert(0, {"type": "header-based-testing-filter"})
    for profile in doc["schedulingProfiles"]:
        profile["plugins"].insert(0, {"pluginRef": "header-based-testing-filter"})
    return yaml.safe_dump(doc, sort_keys=False)
