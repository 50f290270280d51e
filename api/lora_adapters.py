"""The adapters file between the controllers and the runtime sidecar (infergw/runtime): what a
Model's pods keep loaded. The controllers write it (controllers/adapters.py: in a cluster a
ConfigMap mounted into the pod, standalone a file of this machine); the sidecar reads and
checks it here, since what reaches the engine's API and the disk must be safe whoever wrote it.

The file is JSON: `{"adapters": [{"name", "source", "path", "download"}]}` — the name the
engine serves it as, its artifact URI, the path the engine loads it from, and whether the
sidecar downloads it there first (then the path must be `<models dir>/lora/<name>`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from infergw.api.meta import ARTIFACT_URI, ARTIFACT_URI_RULE

# Whose adapter routes the sidecar calls (runtime/engine_api.py): vLLM's (the simulator's too)
# or SGLang's.
VLLM_API = "vllm"
SGLANG_API = "sglang"
ENGINE_APIS = (VLLM_API, SGLANG_API)
ADAPTERS_KEY = "adapters"
MAX_ADAPTERS = 32  # the CRDs' bound on a Model's and a ModelRoute's loraAdapters
MAX_SOURCE = 2048  # the CRD's bound on an artifactURL
MAX_PATH = 4096
# One path component the engine and the disk both take: no `/`, no leading dot (`..`), no
# spaces or control characters; at most MAX_NAME characters. The CRD and the webhook refuse
# other names (api/workload.py); the sidecar checks again, per adapter, whoever wrote the file.
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\Z")
ADAPTER_NAME_RULE = "a path component: letters, digits, '.', '_' or '-', a letter or digit first"
MAX_NAME = 256
LORA_DIR = "lora"  # the downloaded adapters' links under the models folder
INVALID_ADAPTER = "InvalidAdapter"
UNREADABLE = "AdaptersUnreadable"


class Unreadable(ValueError):
    """The adapters file as a whole cannot be read: nothing is loaded or unloaded on it."""


@dataclass(frozen=True, slots=True)
class Adapter:
    name: str
    source: str
    path: str  # what the engine loads it from
    download: bool = False


@dataclass(frozen=True, slots=True)
class Refused:
    """An entry the sidecar will not act on, and why."""

    name: str
    message: str


def download_path(models_dir: str, name: str) -> str:
    return f"{models_dir.rstrip('/')}/{LORA_DIR}/{name}"


def parse(text: str, models_dir: str) -> tuple[dict[str, Adapter], list[Refused]]:
    """The adapters to keep (by name) and the entries refused; Unreadable if the file is not
    an adapters document at all."""
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise Unreadable(f"not JSON: {exc}") from None
    items = doc.get(ADAPTERS_KEY) if isinstance(doc, dict) else None
    if not isinstance(items, list):
        raise Unreadable(f"not an object with an {ADAPTERS_KEY!r} list")
    if len(items) > MAX_ADAPTERS:
        raise Unreadable(f"{len(items)} adapters, more than {MAX_ADAPTERS}")
    adapters: dict[str, Adapter] = {}
    refused: list[Refused] = []
    for i, item in enumerate(items):
        adapter, problem = _entry(item, models_dir)
        name = item.get("name") if isinstance(item, dict) else None
        label = name if isinstance(name, str) and name else f"#{i}"
        if problem is None and adapter is not None and adapter.name in adapters:
            problem = "given twice"
        if problem is not None or adapter is None:
            refused.append(Refused(_printable(label), problem or "unreadable"))
            continue
        adapters[adapter.name] = adapter
    return adapters, refused


def _entry(item: object, models_dir: str) -> tuple[Adapter | None, str | None]:
    if not isinstance(item, dict):
        return None, "not an object"
    name, source, path = item.get("name"), item.get("source"), item.get("path")
    download = item.get("download", False)
    if not isinstance(name, str) or not ADAPTER_NAME.match(name) or len(name) > MAX_NAME:
        return None, f"the name must be {ADAPTER_NAME_RULE}, at most {MAX_NAME} characters"
    if not isinstance(source, str) or len(source) > MAX_SOURCE or not ARTIFACT_URI.match(source):
        return None, f"the source must be {ARTIFACT_URI_RULE}"
    if not isinstance(path, str) or not path or len(path) > MAX_PATH or _control(path):
        return None, "the path must be a non-empty string without control characters"
    if not isinstance(download, bool):
        return None, "download must be true or false"
    if download and path != download_path(models_dir, name):
        return None, f"a downloaded adapter is loaded from {download_path(models_dir, name)}"
    return Adapter(name, source, path, download), None


def _control(text: str) -> bool:
    return any(ord(c) < 32 or ord(c) == 127 for c in text)


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text[:256])


def document(adapters: list[Adapter]) -> str:
    """The adapters file for these adapters (what the controllers write)."""
    items = [
        {"name": a.name, "source": a.source, "path": a.path, "download": a.download}
        for a in adapters
    ]
    return json.dumps({ADAPTERS_KEY: items}, indent=2, sort_keys=True) + "\n"
