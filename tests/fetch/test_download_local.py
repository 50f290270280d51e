"""`infergate download` of a folder on this machine (a path, `file://`, `pvc://CLAIM/PATH` under
`--pvc-root`), and the parts every source shares: the names a listing may give, the cache key,
the progress bar on a terminal."""

from __future__ import annotations

import io
import logging
import os

import pytest

from infergw.fetch.cache import MANIFEST
from infergw.fetch.progress import Progress
from infergw.fetch.progress import said as progress_said
from infergw.fetch.snapshot import RemoteFile, checked_files
from infergw.fetch.source import Unsafe
from tests.fetch.conftest import download_cli, entries


def test_a_claim_is_read_under_the_pvc_root_and_a_change_makes_a_new_entry(tmp_path) -> None:
    model = tmp_path / "mnt" / "claim" / "llama"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "sub" / "w.bin").write_bytes(b"w" * 1000)
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    (blobs / "t").write_text("tok")
    (model / "tokenizer.json").symlink_to(blobs / "t")  # as a Hugging Face cache links its blobs
    args = (f"--cache-dir={tmp_path / 'cache'}", f"--pvc-root={tmp_path / 'mnt'}")
    out = download_cli("pvc://claim/llama", *args, f"--dest={tmp_path / 'm'}")
    assert out.returncode == 0, out.stderr
    dest = tmp_path / "m"
    assert (dest / "sub" / "w.bin").read_bytes() == b"w" * 1000
    assert (dest / "tokenizer.json").read_text() == "tok" and not (
        dest / "tokenizer.json"
    ).is_symlink()
    assert (dest / MANIFEST).is_file()

    (model / "config.json").write_text('{"changed": 1}')
    os.utime(model / "config.json", ns=(1, 1))
    again = download_cli("pvc://claim/llama", *args)
    assert again.returncode == 0 and len(entries(tmp_path / "cache")) == 2


def test_a_linked_folder_is_refused(tmp_path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "etc").symlink_to("/etc")
    out = download_cli(str(tmp_path / "model"), f"--cache-dir={tmp_path / 'cache'}")
    assert out.returncode == 7 and "link to a folder" in out.stderr


def test_a_real_folder_at_dest_is_left_alone(tmp_path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "a").write_text("a")
    (tmp_path / "dest").mkdir()
    out = download_cli(
        f"file://{tmp_path / 'model'}",
        f"--cache-dir={tmp_path / 'c'}",
        f"--dest={tmp_path / 'dest'}",
    )
    assert out.returncode == 1 and "is not a link" in out.stderr
    assert (tmp_path / "dest").is_dir() and not (tmp_path / "dest").is_symlink()


@pytest.mark.parametrize(
    ("names", "said"),
    [
        (["a", "a"], "listed twice"),
        (["a", "a/b"], "both a file and a folder"),
        (["x" * 256], "over 255 bytes"),
        (["a\0b"], "refusing"),
    ],
)
def test_listings_that_cannot_be_one_folder_are_refused(names, said) -> None:
    with pytest.raises(Unsafe, match=said):
        checked_files([RemoteFile(n, 1) for n in names], "src")


def test_the_bar_is_drawn_in_place_on_a_terminal() -> None:
    out = io.StringIO()
    progress = Progress("hf://org/tiny", out=out, tty=True)
    progress.begin(total=2048, files=2)
    progress.file("model.safetensors")
    progress.advance(1024)
    drawn = out.getvalue()
    assert drawn.startswith("\r[###############") and " 50% " in drawn and "file 0/2" in drawn


def test_a_log_tail_says_where_the_download_is_in_numbers_alone(caplog) -> None:
    progress = Progress("hf://org/tiny", out=io.StringIO(), tty=False)
    progress.begin(total=3 << 30, files=4)
    progress.file("model-00001-of-00002.safetensors")
    progress.advance(1 << 30)
    logged = f"2026-12-07 16:00:00,000 INFO fetch.download: {progress.line()}"
    said = progress_said(f"starting\n{logged}\nsomething else\n")
    assert said is not None and said.startswith("33% (1.0 GiB of 3.0 GiB, ")
    assert said.endswith("/s), file 0 of 4")  # the file's name, from the source, is not said
    with caplog.at_level(logging.INFO, "fetch.download"):
        progress.waiting("pid 7 on node-a", 12.4)
    assert progress_said(caplog.records[-1].getMessage()) == (
        "waiting for another download of the same files (12s)"
    )
    assert progress_said("Traceback\nOSError: boom\n") is None
    assert progress_said("] 999999% x/y") is None
