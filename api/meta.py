"""What every kind shares: object metadata, conditions, the struct base and validation helpers.

Optional fields default to None rather than to the CRD's default, so that an object read from
YAML and written back is unchanged; the CRD defaults live in the kinds' modules as constants
and validation reads them through `or`.
"""

from __future__ import annotations

import re
from collections.abc import Sized
from typing import Any

import msgspec


class ApiStruct(msgspec.Struct, rename="camel", omit_defaults=True, kw_only=True):
    """Base of every API type: camelCase JSON names, unset fields left out, unknown fields kept
    out of the way (ignored) so newer objects still load."""


class ObjectMeta(ApiStruct):
    name: str | None = None
    generate_name: str | None = None
    namespace: str | None = None
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None
    uid: str | None = None
    resource_version: str | None = None
    generation: int | None = None
    creation_timestamp: str | None = None
    deletion_timestamp: str | None = None
    finalizers: list[str] | None = None
    owner_references: list[dict[str, Any]] | None = None
    managed_fields: list[dict[str, Any]] | None = None


class Condition(ApiStruct):
    """metav1.Condition."""

    type: str
    status: str
    reason: str
    message: str = ""
    last_transition_time: str | None = None
    observed_generation: int | None = None


class LocalRef(ApiStruct):
    """A reference by name to an object in the same namespace."""

    name: str


# ---- patterns, the same as the CRDs' ------------------------------------------------------------
# Each ends in \Z, not $: $ also matches before a trailing newline ("llama\n" is no DNS name).

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\Z")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?\Z")
LABEL_KEY = re.compile(
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])\Z"
)
DURATION = re.compile(r"^([0-9]{1,5}(h|m|s|ms)){1,4}\Z")
QUANTITY = re.compile(
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?\Z"
)
# Where a Model's weights or an adapter come from; an http(s):// URL is an archive
# (fetch/archive.py: .tar, .tar.gz, .zip, ...) downloaded and unpacked.
ARTIFACT_URI = re.compile(r"^(hf|ms|s3|obs|pvc|file|https?)://.+\Z")
ARTIFACT_URI_RULE = "a URI with hf, ms, s3, obs, pvc, file, http or https"
METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*\Z")

_DURATION_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
_DURATION_PART = re.compile(r"([0-9]+)(ms|h|m|s)")


def duration_seconds(text: str) -> float:
    """'1m30s' → 90.0; the format the CRDs' duration pattern admits."""
    if not DURATION.match(text):
        raise ValueError(f"not a duration: {text!r}")
    return sum(int(n) * _DURATION_UNITS[unit] for n, unit in _DURATION_PART.findall(text))


# ---- msgspec's errors as `path: message` -------------------------------------------------------

_MISSING_FIELD = re.compile(r"^Object missing required field `([^`]+)`\Z")


def conversion_problem(exc: msgspec.ValidationError, prefix: str = "") -> str:
    """msgspec's "Expected `int`, got `str` - at `$.spec.replicas`" as "spec.replicas: Expected
    `int`, got `str`", and a missing field as "spec.template: is required"; `prefix` is the
    path of what was converted."""
    text = str(exc)
    message, at, where = text.rpartition(" - at ")
    if not at:
        message, where = text, ""
    path = prefix + where.strip("`").removeprefix("$")
    missing = _MISSING_FIELD.match(message)
    if missing:
        path, message = f"{path}.{missing.group(1)}" if path else missing.group(1), "is required"
    return f"{path.removeprefix('.') or '.'}: {message}"


# ---- collecting validation problems -------------------------------------------------------------


class Problems:
    """Collects `path: message` strings; every check is a no-op on None (an unset field)."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.messages.append(f"{path}: {message}")

    def required(self, path: str, value: object) -> bool:
        if value is None:
            self.add(path, "is required")
            return False
        return True

    def number(
        self,
        path: str,
        value: float | None,
        low: float | None = None,
        high: float | None = None,
        *,
        above: bool = False,
    ) -> None:
        """low <= value <= high; with `above`, low < value."""
        if value is None or isinstance(value, str):
            return
        too_low = low is not None and (value <= low if above else value < low)
        if not too_low and (high is None or value <= high):
            return
        if above:
            bounds = [f"above {low:g}"] + ([f"at most {high:g}"] if high is not None else [])
            self.add(path, "must be " + " and ".join(bounds))
        elif low is not None and high is not None:
            self.add(path, f"must be {low:g}..{high:g}")
        elif low is not None:
            self.add(path, f"must be at least {low:g}")
        else:
            self.add(path, f"must be at most {high:g}")

    def length(self, path: str, value: Sized | None, low: int, high: int, what: str) -> None:
        if value is not None and not low <= len(value) <= high:
            self.add(path, f"must have {low}..{high} {what}")

    def text(self, path: str, value: str | None, low: int, high: int) -> None:
        if value is not None and not low <= len(value) <= high:
            self.add(path, f"must be {low}..{high} characters")

    def choice(self, path: str, value: str | None, allowed: tuple[str, ...]) -> None:
        if value is not None and value not in allowed:
            self.add(path, f"must be one of {', '.join(allowed)}")

    def match(self, path: str, value: str | None, pattern: re.Pattern[str], what: str) -> None:
        if value is not None and not pattern.match(value):
            self.add(path, f"must be {what}")

    def labels(self, path: str, labels: dict[str, str] | None, low: int, high: int) -> None:
        if labels is None:
            return
        self.length(path, labels, low, high, "labels")
        for key, value in labels.items():
            self.match(f"{path}[{key}]", value, LABEL_VALUE, "a label value")
            if len(value) > 63:
                self.add(f"{path}[{key}]", "must be at most 63 characters")

    def unique(self, path: str, keys: list[object], what: str) -> None:
        seen: set[object] = set()
        for i, key in enumerate(keys):
            if key in seen:
                self.add(f"{path}[{i}]", f"duplicate {what} {key!r}")
            seen.add(key)


def check_object_meta(meta: ObjectMeta) -> list[str]:
    """The API server's rules for a custom object's name and namespace: the standalone
    runtime makes file names of them, and the controllers pod names."""
    p = Problems()
    for path, value, limit, pattern, what in (
        ("metadata.name", meta.name, 253, DNS_SUBDOMAIN, "a lowercase DNS subdomain"),
        ("metadata.namespace", meta.namespace, 63, DNS_LABEL, "a lowercase DNS label"),
    ):
        if value is not None and (len(value) > limit or not pattern.match(value)):
            p.add(path, f"must be {what} of at most {limit} characters")
    return p.messages


def check_status_conditions(problems: Problems, path: str, conds: list[Condition] | None) -> None:
    if conds is None:
        return
    problems.length(path, conds, 0, 8, "conditions")
    problems.unique(path, [c.type for c in conds], "condition type")
    for i, cond in enumerate(conds):
        problems.choice(f"{path}[{i}].status", cond.status, ("True", "False", "Unknown"))
