"""The picker's tokenizer for a Model whose weights are downloaded (a real engine's `hf://`,
`s3://` or `obs://` model): the same files the engine reads. Before the picker starts, the
stack runs `infergate fetch tokenizer --from-weights-cache` (fetch/tokenizer.py) with the
Model's source settings: it copies the tokenizer from this machine's weights cache when the engine's
download is there at the revision resolved now, and otherwise fetches the tokenizer files
alone at that revision (a Model at zero has downloaded nothing yet). In a cluster the
picker's own init container does the fetch (controllers/picker_objects.py): its pod cannot
read the node's cache.

A failure is not the stack's: the picker then tokenizes with the simulator's tokenizer, as it
did before, and the stack says so."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from infergw.api.engines import runs_simulator
from infergw.api.names import FETCH_ENV
from infergw.api.workload import DEFAULT_ENGINE
from infergw.fetch.tokenizer import SCHEMES as TOKENIZER_SCHEMES

FETCH_TIMEOUT = 120.0  # seconds for the whole fetch (a listing and a few small files)


@dataclass(frozen=True, slots=True)
class TokenizerSource:
    """Where a Model's tokenizer comes from, and the source settings of its env."""

    uri: str
    revision: str | None
    env: tuple[tuple[str, str], ...]

    @classmethod
    def of(cls, model: dict) -> TokenizerSource | None:
        """The Model's, if its weights are downloaded from a source the fetch reads."""
        spec = model["spec"]
        uri = str(spec.get("modelURI") or "")
        engine = (spec.get("engine") or {}).get("type") or DEFAULT_ENGINE
        if uri.partition("://")[0] not in TOKENIZER_SCHEMES or runs_simulator(
            engine, str(spec.get("image") or "")
        ):
            return None
        env = tuple(
            (str(e["name"]), str(e["value"]))
            for e in spec.get("env") or []
            if isinstance(e, dict) and e.get("name") in FETCH_ENV and "value" in e
        )
        return cls(uri, spec.get("modelRevision"), env)


def fetch_tokenizer(
    source: TokenizerSource, dest: Path, cache_dir: Path | None, log: Path
) -> str | None:
    """The tokenizer into `dest`; None, or why it could not be had (the fetch's last line)."""
    cmd = [sys.executable, "-m", "infergw.fetch", "tokenizer", f"--source={source.uri}"]
    cmd += [f"--dest={dest}", "--from-weights-cache"]
    cmd += [f"--revision={source.revision}"] if source.revision else []
    cmd += [f"--cache-dir={cache_dir}"] if cache_dir is not None else []
    # This machine's environment less its own source settings: the Model's alone count.
    env = {k: v for k, v in os.environ.items() if k not in FETCH_ENV} | dict(source.env)
    try:
        with open(log, "ab") as out:
            done = subprocess.run(
                cmd, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=FETCH_TIMEOUT
            )
    except subprocess.TimeoutExpired:
        return f"no answer within {FETCH_TIMEOUT:.0f} s"
    if done.returncode == 0:
        return None
    lines = log.read_text(errors="replace").strip().splitlines()
    return lines[-1][-300:] if lines else f"exit {done.returncode}"
