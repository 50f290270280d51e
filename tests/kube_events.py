"""kube-apiserver's validation of an `events.k8s.io/v1` Event, for the emulator (tests/kubeapi.py):
the fields an Event must carry on create (pkg/apis/core/validation/events.go,
ValidateEventCreate with its legacy checks) and what an update may not change
(ValidateEventUpdate). Written out here, not imported from the controllers: what they write is
what this checks."""

from __future__ import annotations

import re
from typing import Any

from tests.kube_schema import FieldError, invalid, required

Obj = dict[str, Any]
EVENTS_API = "events.k8s.io/v1"
# In bytes of UTF-8, as Go's len() counts a string.
FIELD_LIMIT = 128  # reportingController, reportingInstance, action, reason
NOTE_LIMIT = 1024  # the note (1 kB)
TYPES = ("Normal", "Warning")
# metav1.MicroTime: RFC 3339 with microseconds (the API server also reads seconds)
MICRO_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?(Z|[+-]\d\d:\d\d)$")
QUALIFIED = re.compile(
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)
# Fields an update may not change (ValidateEventUpdate): everything but the series and
# metadata's mutable parts.
IMMUTABLE = (
    "eventTime",
    "reportingController",
    "reportingInstance",
    "action",
    "reason",
    "note",
    "type",
    "regarding",
    "related",
)


def is_event(obj: Obj) -> bool:
    return obj.get("apiVersion") == EVENTS_API and obj.get("kind") == "Event"


def event_errors(obj: Obj, old: Obj | None) -> list[FieldError]:
    if old is not None:
        return [
            invalid(f, obj.get(f), "field is immutable")
            for f in IMMUTABLE
            if obj.get(f) != old.get(f)
        ] + _series_errors(obj)
    errors: list[FieldError] = []
    if not _time(obj.get("eventTime")):
        errors.append(required("eventTime"))
    if obj.get("type") not in TYPES:
        errors.append(invalid("type", obj.get("type"), f"has invalid value: {obj.get('type')}"))
    for f in ("reportingController", "reportingInstance", "action", "reason"):
        value = obj.get(f)
        if not isinstance(value, str) or not value:
            errors.append(required(f))
        elif len(value.encode()) > FIELD_LIMIT:
            errors.append(invalid(f, value, f"can have at most {FIELD_LIMIT} characters"))
    controller = obj.get("reportingController")
    if isinstance(controller, str) and controller and not QUALIFIED.match(controller):
        errors.append(invalid("reportingController", controller, "must be a qualified name"))
    note = obj.get("note", "")
    if not isinstance(note, str) or len(note.encode()) > NOTE_LIMIT:
        errors.append(invalid("note", "", f"can have at most {NOTE_LIMIT} characters"))
    regarding = obj.get("regarding")
    ns = (obj.get("metadata") or {}).get("namespace", "")
    if not isinstance(regarding, dict) or not regarding.get("kind") or not regarding.get("name"):
        errors.append(required("regarding"))
    elif regarding.get("namespace") and regarding["namespace"] != ns:
        errors.append(
            invalid("regarding.namespace", regarding["namespace"], "does not match event.namespace")
        )
    # the fields of the core v1 Event that the events.k8s.io API writes no more
    for f in ("deprecatedSource", "deprecatedFirstTimestamp", "deprecatedLastTimestamp"):
        if obj.get(f):
            errors.append(invalid(f, "", "needs to be unset"))
    if obj.get("deprecatedCount"):
        errors.append(invalid("deprecatedCount", "", "needs to be unset"))
    return errors + _series_errors(obj)


def _series_errors(obj: Obj) -> list[FieldError]:
    series = obj.get("series")
    if series is None:
        return []
    if not isinstance(series, dict):
        return [invalid("series", series, "must be an object")]
    errors = []
    count = series.get("count")
    if type(count) is not int or count < 2:
        errors.append(invalid("series.count", count, "should be at least 2"))
    if not _time(series.get("lastObservedTime")):
        errors.append(required("series.lastObservedTime"))
    return errors


def _time(value: Any) -> bool:
    return isinstance(value, str) and bool(MICRO_TIME.match(value))
