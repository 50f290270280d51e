"""Which files of a Model's source its weights download takes: `spec.modelRevision` (an hf://
repository's branch, tag or commit) and `spec.modelFiles` (include and exclude globs), with
the checks the CRD makes of them (controllers/weights.py turns them into the download's flags;
fetch/download.py checks them again, a command line being input too)."""

from __future__ import annotations

import re

from infergw.api.meta import ApiStruct, Problems

# spec.modelRevision: a Hub branch, tag or commit, as a git ref name spells one (no `..`, no
# leading dash or slash); the downloader and the picker's tokenizer fetch read the weights there.
MODEL_REVISION = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._/-]{0,254}\Z")
MODEL_REVISION_RULE = "a branch, tag or commit (letters, digits, . _ / -)"
REVISION_DOTS = "a revision must not contain '..'"  # the CEL message
REVISION_NEEDS_HF = "modelRevision applies to hf:// models only"
MAX_FILE_GLOBS = 32
MAX_FILE_GLOB = 256
# spec.modelFiles' globs: path characters and fnmatch's, nothing a shell or the kubelet's
# $(VAR) expansion would read (they become the download's arguments).
MODEL_FILE_GLOB = re.compile(r"^[A-Za-z0-9._/*?\[\]!-]+\Z")
MODEL_FILE_GLOB_RULE = "a file glob (letters, digits, . _ / - and * ? [ ] !)"


class ModelFiles(ApiStruct):
    """Which files of the model's source are downloaded (shell globs on paths relative to
    it): only those matching `include` (all if unset), less those matching `exclude`; unset
    `exclude` leaves the downloader's default out (fetch/download.py: a repository's
    `original/*`, `*.pth` and `pytorch_model*.bin` when it has safetensors), `[]` leaves
    nothing out."""

    include: list[str] | None = None
    exclude: list[str] | None = None


def check_model_source(
    p: Problems, uri: str, revision: str | None, files: ModelFiles | None
) -> None:
    """spec.modelRevision and spec.modelFiles: what the downloader is given."""
    if revision is not None:
        p.match("spec.modelRevision", revision, MODEL_REVISION, MODEL_REVISION_RULE)
        if ".." in revision:
            p.add("spec.modelRevision", REVISION_DOTS)
        if not uri.startswith("hf://"):
            p.add("spec", REVISION_NEEDS_HF)
    for part in ("include", "exclude") if files is not None else ():
        globs = getattr(files, part)
        if globs is None:
            continue
        path = f"spec.modelFiles.{part}"
        p.length(path, globs, 0, MAX_FILE_GLOBS, "items")
        for i, glob in enumerate(globs):
            p.text(f"{path}[{i}]", glob, 1, MAX_FILE_GLOB)
            p.match(f"{path}[{i}]", glob, MODEL_FILE_GLOB, MODEL_FILE_GLOB_RULE)
