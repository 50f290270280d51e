"""`infergate download hf://...` against a Hub mirror of our own over real HTTP (hub_mirror.py),
run as the init container runs it: a snapshot listed by the revision API and read at its
commit, the token to the Hub only, a cut transfer resumed by range (in one run, and in the
next run), bytes that differ from the listing, hostile listings, a full disk (a real tmpfs,
and a file size limit), and two downloaders sharing one copy (real processes).
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from infergw.fetch.cache import MANIFEST
from tests.fetch.conftest import download_cli, entries
from tests.fetch.hub_mirror import COMMIT, Mirror, running_mirror
from tests.paths import DEFAULT_MODEL

REPO = "org/tiny"
TOKEN = "hf_secret"
WEIGHTS = random.Random(17).randbytes(3 << 20)
ADAPTER = random.Random(18).randbytes(200 << 10)


def files() -> dict[str, bytes]:
    return {
        "config.json": b'{"model_type": "llama"}',
        "tokenizer.json": (DEFAULT_MODEL / "tokenizer.json").read_bytes(),
        "model.safetensors": WEIGHTS,
        "sub/adapter.bin": ADAPTER,
    }


@pytest.fixture
def hub() -> Iterator[Mirror]:
    mirror = Mirror(REPO, files(), lfs={"model.safetensors", "sub/adapter.bin"})
    with running_mirror(mirror):
        yield mirror


def flipped(data: bytes) -> bytes:
    """The same length, one byte changed."""
    return bytes([data[0] ^ 0xFF]) + data[1:]


def run(hub: Mirror, tmp: Path, *flags: str, **env: str) -> subprocess.CompletedProcess:
    return download_cli(
        f"hf://{REPO}",
        f"--cache-dir={tmp / 'cache'}",
        f"--dest={tmp / 'models' / 'm'}",
        "--retries=1",
        *flags,
        HF_ENDPOINT=hub.hub_url,
        **env,
    )


def tree(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and p.name != MANIFEST
    }


def no_entry_and_nothing_outside(tmp: Path) -> None:
    assert entries(tmp / "cache") == []
    assert not (tmp / "models" / "m").exists()
    assert sorted(p.name for p in tmp.iterdir()) in ([], ["cache"], ["cache", "models"])


def test_a_snapshot_is_read_at_its_commit_verified_and_linked(hub, tmp_path) -> None:
    hub.token = TOKEN
    out = run(hub, tmp_path, f"--progress-file={tmp_path / 'progress.json'}", HF_TOKEN=TOKEN)
    assert out.returncode == 0, out.stderr
    dest = tmp_path / "models" / "m"
    assert out.stdout.strip() == str(dest)
    assert dest.is_symlink() and tree(dest) == files()
    manifest = json.loads((dest / MANIFEST).read_text())
    assert manifest["source"] == f"hf://{REPO}" and manifest["revision"] == COMMIT
    # Every file at the commit the API answered, never at the moving branch.
    resolved = [r.path for r in hub.requests if "/resolve/" in r.path]
    assert resolved and all(f"/resolve/{COMMIT}/" in p for p in resolved)
    assert {r.auth for r in hub.requests if r.host == "hub"} == {f"Bearer {TOKEN}"}
    assert {r.auth for r in hub.requests if r.host == "cdn"} == {None}  # another host
    progress = json.loads((tmp_path / "progress.json").read_text())
    assert progress["phase"] == "done" and progress["bytesDone"] == progress["bytesTotal"]
    assert progress["filesDone"] == progress["files"] == 4

    hub.requests.clear()
    again = run(hub, tmp_path, HF_TOKEN=TOKEN)
    assert again.returncode == 0 and "already in the cache" in again.stderr
    assert [r for r in hub.requests if "/resolve/" in r.path or r.host == "cdn"] == []
    assert len(entries(tmp_path / "cache")) == 1
    assert not any((tmp_path / "cache" / ".staging").iterdir())


def test_a_cut_transfer_resumes_by_range_within_the_run(hub, tmp_path) -> None:
    hub.cut_after = {"model.safetensors": 1 << 20}
    out = run(hub, tmp_path)
    assert out.returncode == 0, out.stderr
    asked = hub.asked("cdn", "model.safetensors")
    assert [r.range for r in asked] == [None, f"bytes={1 << 20}-"]
    assert tree(tmp_path / "models" / "m") == files()
    assert "trying again" in out.stderr


def test_a_run_that_fails_mid_file_leaves_no_entry_and_the_next_one_resumes(hub, tmp_path) -> None:
    hub.cut_after, hub.cut_times = {"model.safetensors": 1 << 20}, 2
    out = run(hub, tmp_path, f"--termination-log={tmp_path / 'term.log'}")
    assert out.returncode == 5, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("infergate download: TransferFailed: ") and "run it again" in last
    assert (tmp_path / "term.log").read_text().startswith("TransferFailed: ")
    assert entries(tmp_path / "cache") == [] and not (tmp_path / "models").exists()
    partials = list((tmp_path / "cache" / ".staging").glob("*.partial/model.safetensors"))
    assert [p.stat().st_size for p in partials] == [1 << 20]

    hub.requests.clear()
    again = run(hub, tmp_path)
    assert again.returncode == 0, again.stderr
    assert [r.range for r in hub.asked("cdn", "model.safetensors")] == [f"bytes={1 << 20}-"]
    assert tree(tmp_path / "models" / "m") == files()


def test_bytes_that_differ_from_the_listing_are_refused_and_dropped(hub, tmp_path) -> None:
    hub.served = {"model.safetensors": flipped(WEIGHTS)}
    out = run(hub, tmp_path)
    assert out.returncode == 5
    assert "model.safetensors: its content is not the listed one (sha256" in out.stderr
    no_entry_and_nothing_outside(tmp_path)
    assert list((tmp_path / "cache" / ".staging").glob("*.partial/model.safetensors")) == []


def test_a_file_kept_in_git_is_checked_by_its_blob_id(hub, tmp_path) -> None:
    hub.served = {"config.json": flipped(files()["config.json"])}
    out = run(hub, tmp_path)
    assert out.returncode == 5 and "config.json" in out.stderr and "git blob sha1" in out.stderr


@pytest.mark.parametrize(
    ("uri", "flags", "env", "code", "said"),
    [
        ("hf://org/other", [], {}, 3, "SourceNotFound: "),
        (f"hf://{REPO}", ["--revision=v9"], {}, 3, "HTTP 404"),
        (f"hf://{REPO}", [], {"gated": "1"}, 4, "set HF_TOKEN"),
        (f"hf://{REPO}", [], {"gated": "1", "HF_TOKEN": "hf_wrong"}, 4, "HF_TOKEN has no access"),
        ("hf://org/../etc", [], {}, 2, "not a repository id"),
        ("ms://org/tiny", [], {}, 2, "InvalidSource"),
    ],
    ids=["missing-repo", "missing-revision", "no-token", "wrong-token", "traversal", "scheme"],
)
def test_bad_sources_and_credentials_say_so_with_their_exit_code(
    hub, tmp_path, uri, flags, env, code, said
) -> None:
    env = dict(env)
    if env.pop("gated", None):
        hub.token = TOKEN
    out = download_cli(
        uri, f"--cache-dir={tmp_path / 'cache'}", *flags, HF_ENDPOINT=hub.hub_url, **env
    )
    assert out.returncode == code, out.stderr
    assert said in out.stderr.strip().splitlines()[-1]
    assert entries(tmp_path / "cache") == []


@pytest.mark.parametrize(
    "name", ["../escape.bin", "/etc/passwd", "a/../../b", "sub\\..\\x", "./x", "a//b"]
)
def test_a_listing_naming_paths_outside_the_folder_is_refused(hub, tmp_path, name) -> None:
    hub.extra_listed = [{"rfilename": name, "size": 3, "blobId": "0" * 40}]
    out = run(hub, tmp_path)
    assert out.returncode == 7 and "UnsafeSource" in out.stderr, out.stderr
    no_entry_and_nothing_outside(tmp_path)
    assert not (tmp_path.parent / "escape.bin").exists()


def test_a_listing_with_a_name_both_file_and_folder_is_refused(hub, tmp_path) -> None:
    hub.extra_listed = [{"rfilename": "sub", "size": 3}]
    out = run(hub, tmp_path)
    assert out.returncode == 7 and "both a file and a folder" in out.stderr


def test_a_snapshot_over_max_bytes_is_refused_before_any_transfer(hub, tmp_path) -> None:
    out = run(hub, tmp_path, "--max-bytes=1000000")
    assert out.returncode == 7 and "more than --max-bytes 1000000" in out.stderr
    assert [r for r in hub.requests if "/resolve/" in r.path] == []


def test_a_file_longer_than_listed_is_cut_off_and_dropped(hub, tmp_path) -> None:
    hub.served = {"model.safetensors": WEIGHTS + b"more"}
    out = run(hub, tmp_path)
    assert out.returncode == 7 and "more than the" in out.stderr, out.stderr
    no_entry_and_nothing_outside(tmp_path)


# ---- a full disk -------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A real 1 MiB filesystem (tmpfs; mounting needs root, which CI has)."""
    where = tmp_path / "small"
    where.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)])
    if made.returncode != 0:
        pytest.skip("this machine does not let us mount a tmpfs")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_full_disk_is_said_before_the_transfer_when_the_sizes_are_known(
    hub, tmp_path, small_disk
) -> None:
    out = download_cli(f"hf://{REPO}", f"--cache-dir={small_disk}", HF_ENDPOINT=hub.hub_url)
    assert out.returncode == 6, out.stderr
    assert "NoSpace: " in out.stderr and "are free" in out.stderr
    assert entries(small_disk) == []
    assert [r for r in hub.requests if "/resolve/" in r.path] == []


def test_a_disk_that_fills_mid_transfer_fails_with_no_entry(hub, tmp_path, small_disk) -> None:
    hub.sizes = False  # a listing without sizes: nothing to check the space against first
    out = download_cli(
        f"hf://{REPO}",
        f"--cache-dir={small_disk}",
        f"--progress-file={tmp_path / 'progress.json'}",
        HF_ENDPOINT=hub.hub_url,
    )
    assert out.returncode == 6, out.stderr
    assert "No space left on device" in out.stderr and "free space" in out.stderr
    assert entries(small_disk) == []
    progress = json.loads((tmp_path / "progress.json").read_text())
    assert progress["phase"] == "failed" and progress["reason"] == "NoSpace"


def test_a_file_size_limit_is_reported_as_no_space_not_a_kill(hub, tmp_path) -> None:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "INFERGATE"))}
    out = subprocess.run(
        [sys.executable, "-m", "infergw.fetch.download", f"hf://{REPO}"],
        env={**env, "HF_ENDPOINT": hub.hub_url, "INFERGATE_CACHE_DIR": str(tmp_path / "cache")},
        preexec_fn=limit,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 6, out.stderr
    assert "File too large" in out.stderr
    assert entries(tmp_path / "cache") == []


# ---- two downloaders on one node -----------------------------------------------------------


def test_two_downloaders_share_one_copy(hub, tmp_path) -> None:
    hub.drip = 0.05  # 3 MiB in 48 chunks: the second process starts while the first is at it
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "INFERGATE"))}
    env = {**clean, "HF_ENDPOINT": hub.hub_url}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "infergw.fetch.download",
                f"hf://{REPO}",
                f"--cache-dir={tmp_path / 'cache'}",
                f"--dest={tmp_path / f'pod{i}' / 'm'}",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert len(hub.asked("cdn", "model.safetensors")) == 1  # one copy fetched
    assert len(hub.asked("hub", "config.json")) == 1
    assert sum("waiting for pid" in err for _out, err in outs) == 1
    links = {(tmp_path / f"pod{i}" / "m").resolve() for i in range(2)}
    assert len(links) == 1 and tree(links.pop()) == files()
    assert len(entries(tmp_path / "cache")) == 1
