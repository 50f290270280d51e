"""Which snapshot and which of its files `infergate download` takes (a Model's modelRevision
and modelFiles): the revision asked of the Hub mirror (over real HTTP), refused when it is
no revision name; a repository with safetensors less Meta's original/ checkpoint and PyTorch
pickles by default, everything with --no-default-exclude, the chosen globs with --include
and --exclude; a repository without safetensors whole."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from infergw.fetch.cache import MANIFEST
from tests.fetch.conftest import download_cli, entries
from tests.fetch.hub_mirror import COMMIT, Mirror, running_mirror

REPO = "org/llama"
FILES = {
    "config.json": b'{"model_type": "llama"}',
    "tokenizer.json": b"{}",
    "model.safetensors": b"s" * 4096,
    "original/consolidated.00.pth": b"p" * 8192,
    "original/params.json": b"{}",
    "pytorch_model.bin": b"b" * 4096,
}


@pytest.fixture
def hub() -> Iterator[Mirror]:
    with running_mirror(Mirror(REPO, dict(FILES))) as mirror:
        yield mirror


def downloaded(hub: Mirror, tmp: Path, *flags: str) -> set[str]:
    dest = tmp / "models" / "m"
    done = download_cli(
        f"hf://{REPO}",
        f"--cache-dir={tmp / 'cache'}",
        f"--dest={dest}",
        *flags,
        HF_ENDPOINT=hub.hub_url,
    )
    assert done.returncode == 0, done.stderr
    return {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()} - {MANIFEST}


def test_beside_safetensors_the_original_checkpoint_and_pickles_are_left_out(hub, tmp_path):
    got = downloaded(hub, tmp_path)
    assert got == {"config.json", "tokenizer.json", "model.safetensors"}
    assert not hub.asked("hub", "original/consolidated.00.pth")
    assert not hub.asked("hub", "pytorch_model.bin")


def test_no_default_exclude_keeps_every_file_in_an_entry_of_its_own(hub, tmp_path):
    downloaded(hub, tmp_path)
    assert downloaded(hub, tmp_path, "--no-default-exclude") == set(FILES)
    assert len(entries(tmp_path / "cache")) == 2  # other files chosen: another entry


def test_include_and_exclude_choose_the_files(hub, tmp_path):
    got = downloaded(hub, tmp_path, "--include=*.json", "--exclude=original/*")
    assert got == {"config.json", "tokenizer.json"}


def test_a_repository_without_safetensors_is_taken_whole(tmp_path):
    pickles = {k: v for k, v in FILES.items() if not k.endswith(".safetensors")}
    with running_mirror(Mirror(REPO, pickles)) as hub:
        assert downloaded(hub, tmp_path) == set(pickles)


def test_the_revision_is_the_one_asked_of_the_hub(hub, tmp_path):
    downloaded(hub, tmp_path, f"--revision={COMMIT}")
    listings = [r.path for r in hub.requests if r.host == "hub" and "/api/models/" in r.path]
    assert listings and all(f"/revision/{COMMIT}?" in p for p in listings)

    missing = download_cli(
        f"hf://{REPO}", f"--cache-dir={tmp_path / 'c2'}", "--revision=v9", HF_ENDPOINT=hub.hub_url
    )
    assert missing.returncode != 0 and "SourceNotFound" in missing.stderr


@pytest.mark.parametrize("revision", ["../main", "main/../x", "-rf", "a b"])
def test_a_revision_that_is_no_name_is_refused_before_asking(hub, tmp_path, revision):
    done = download_cli(
        f"hf://{REPO}",
        f"--cache-dir={tmp_path / 'cache'}",
        f"--revision={revision}",
        HF_ENDPOINT=hub.hub_url,
    )
    assert done.returncode == 2 and "InvalidSource" in done.stderr, done.stderr
    assert hub.requests == []
