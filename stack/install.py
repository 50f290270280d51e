"""`infergate install`: the cluster install as one YAML stream for `kubectl apply -f -`.

The files come from the kustomize base (gateway-manifests/kustomization.yaml and the bases it
names), so the stream and `kubectl apply -k gateway-manifests` apply the same objects from one
list. On top of the base this puts the Gateway-side objects into `--namespace` (the values
gateway-manifests/README.md's table lists included) and renames the Gateway (`--gateway`).
The upstream CRDs are never in the stream: `--upstream-crds` prints them alone, to be created
only where the cluster has none.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from infergw.api.cli_help import HelpFormatter
from infergw.api.workload import DEFAULT_GATEWAY
from infergw.api.yaml_files import OWN_FILES_LOADER
from infergw.stack.resources import CRDS, GATEWAY_MANIFESTS

UPSTREAM_CRDS = CRDS / "upstream"
DEFAULT_NAMESPACE = "default"  # the namespace the base's values spell
GATEWAY_FLAG = "--gateway="  # the body-based router's (gateway-manifests/bbr/bbr.yaml)
# The controllers' files keep their own namespace (infergate-system): never moved.
SYSTEM_FILES = frozenset({"controllers.yaml", "webhook.yaml"})
CLUSTER_SCOPED = frozenset(
    {
        "Namespace",
        "CustomResourceDefinition",
        "ClusterRole",
        "ClusterRoleBinding",
        "ValidatingWebhookConfiguration",
        "MutatingWebhookConfiguration",
        "GatewayClass",
    }
)
# A DNS-1123 label: what a namespace or a Gateway's name may be.
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")

Obj = dict[str, Any]


@dataclass(frozen=True)
class Target:
    """Where the Gateway-side objects go and the Gateway they belong to."""

    namespace: str = DEFAULT_NAMESPACE
    gateway: str = DEFAULT_GATEWAY

    def __post_init__(self) -> None:
        for what, value in (("namespace", self.namespace), ("gateway", self.gateway)):
            if not _DNS_LABEL.fullmatch(value):
                raise ValueError(f"--{what} {value!r} is not a DNS-1123 label")


@dataclass(frozen=True)
class Source:
    """One manifest file of the base, and whether it moves to the target namespace."""

    path: Path
    movable: bool


def base_files(kustomization_dir: Path = GATEWAY_MANIFESTS) -> list[Source]:
    """The files the kustomization names, its `bases:` first (as kustomize loads them)."""
    spec = yaml.safe_load((kustomization_dir / "kustomization.yaml").read_text())
    files: list[Source] = []
    for base in spec.get("bases") or []:
        files += base_files((kustomization_dir / base).resolve())
    for name in spec.get("resources") or []:
        path = (kustomization_dir / name).resolve()
        files.append(Source(path, movable=path.name not in SYSTEM_FILES and path.parent != CRDS))
    return files


def _namespaced_values(text: str, namespace: str) -> str:
    """The values that spell the namespace (gateway-manifests/README.md's table)."""
    if namespace == DEFAULT_NAMESPACE:
        return text
    text = re.sub(r"\.default\.svc\b", f".{namespace}.svc", text)
    text = re.sub(r"\bdefault/(?=[a-z0-9-]+/)", f"{namespace}/", text)
    return re.sub(r"(owning-gateway-namespace: )default\b", rf"\g<1>{namespace}", text)


def _rename_gateway(doc: Obj, gateway: str) -> None:
    """The Gateway itself and every reference to it, the xDS names an EnvoyPatchPolicy patches
    (`<namespace>/<Gateway>/<listener>`) included; the GatewayClass keeps its name."""
    if doc["kind"] == "Gateway" and doc["metadata"]["name"] == DEFAULT_GATEWAY:
        doc["metadata"]["name"] = gateway
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        return
    single = [spec["targetRef"]] if isinstance(spec.get("targetRef"), dict) else []
    for ref in single + (spec.get("targetRefs") or []) + (spec.get("parentRefs") or []):
        if ref.get("kind", "Gateway") == "Gateway" and ref.get("name") == DEFAULT_GATEWAY:
            ref["name"] = gateway
    for patch in spec.get("jsonPatches") or []:
        namespace, sep, rest = patch["name"].partition(f"/{DEFAULT_GATEWAY}/")
        if sep and "/" not in namespace:
            patch["name"] = f"{namespace}/{gateway}/{rest}"
    # The body-based router's own --gateway: the one its EnvoyExtensionPolicy targets.
    pod = (spec.get("template") or {}).get("spec") or {}
    for container in pod.get("containers") or []:
        args = container.get("args") or []
        container["args"] = [
            f"{GATEWAY_FLAG}{gateway}" if arg == f"{GATEWAY_FLAG}{DEFAULT_GATEWAY}" else arg
            for arg in args
        ]


def objects(target: Target = Target()) -> Iterator[Obj]:
    """Every object of the install, in the base's order."""
    for source in base_files():
        text = source.path.read_text()
        if source.movable:
            text = _namespaced_values(text, target.namespace)
        for doc in yaml.load_all(text, Loader=OWN_FILES_LOADER):
            if not doc:
                continue
            if source.movable:
                _rename_gateway(doc, target.gateway)
                if doc["kind"] not in CLUSTER_SCOPED:
                    doc["metadata"]["namespace"] = target.namespace
            yield doc


def upstream_crds() -> list[Path]:
    return sorted(UPSTREAM_CRDS.glob("*.yaml"))


def header(target: Target) -> str:
    files = " ".join(str(p.relative_to(CRDS.parent)) for p in upstream_crds())
    lines = [
        "# infergate's cluster install: kubectl apply --server-side -f -",
        "# Needs Envoy Gateway (EnvoyPatchPolicy enabled) with Envoy AI Gateway (v0.4 or",
        "# later)'s InferencePool backend support (README: A Model in a cluster), and",
        "# cert-manager.",
        "# First the upstream CRDs (InferencePool, InferenceObjective), only where the cluster",
        "# has none, so an upstream install is never overwritten (kubectl create refuses an",
        "# existing one):",
        "#   infergate install --upstream-crds > upstream-crds.yaml",
        "#   kubectl get -f upstream-crds.yaml >/dev/null 2>&1 ||",
        "#     kubectl create -f upstream-crds.yaml",
        f"# or, from a checkout: for f in {files}; do",
        '#     kubectl get -f "$f" >/dev/null 2>&1 || kubectl create -f "$f"; done',
        f"# Gateway-side objects: namespace {target.namespace}, Gateway {target.gateway}.",
        "# Then the Gateway's certificate, Secret inference-gateway-tls",
        "# (gateway-manifests/gateway-tls.yaml).",
    ]
    if target.namespace != DEFAULT_NAMESPACE:
        lines.append(f"# Create the namespace first: kubectl create namespace {target.namespace}")
    if target.gateway != DEFAULT_GATEWAY:
        lines.append(
            f"# Models name this Gateway in spec.gateway (their default is {DEFAULT_GATEWAY})."
        )
    return "\n".join(lines) + "\n"


def render(target: Target = Target()) -> str:
    docs = [yaml.safe_dump(doc, sort_keys=False) for doc in objects(target)]
    return header(target) + "---\n" + "---\n".join(docs)


def render_upstream_crds() -> str:
    """The upstream CRDs alone, as shipped (comments and all), for `kubectl create`."""
    return "---\n".join(p.read_text() for p in upstream_crds())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="infergate install",
        description="Print the cluster install as one YAML stream for `kubectl apply -f -`.",
        formatter_class=HelpFormatter,
    )
    what = parser.add_argument_group("What the install holds")
    what.add_argument("--namespace", default=DEFAULT_NAMESPACE, help="for the Gateway-side objects")
    what.add_argument("--gateway", default=DEFAULT_GATEWAY, help="the Gateway's name")
    what.add_argument(
        "--upstream-crds",
        action="store_true",
        help="print only the upstream CRDs, for `kubectl create` where the cluster has none",
    )
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.upstream_crds:
        sys.stdout.write(render_upstream_crds())
        return 0
    try:
        target = Target(args.namespace, args.gateway)
    except ValueError as exc:
        print(f"infergate install: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(render(target))
    return 0
