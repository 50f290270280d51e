"""`infergate download https://.../model.tar.gz`: an archive over real HTTP (hub_mirror.py's CDN
server, with Range), unpacked into the cache entry: one top folder taken as the model, its
SHA-256 checked when given, a cut transfer resumed, and hostile archives refused whole —
names climbing out or absolute, links, devices, a name twice, more bytes unpacked than allowed.
"""

from __future__ import annotations

import hashlib
import io
import random
import stat
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from infergw.fetch.cache import MANIFEST
from tests.fetch.conftest import download_cli, entries
from tests.fetch.hub_mirror import Mirror, running_mirror

WEIGHTS = random.Random(3).randbytes(1 << 20)
MODEL = {"config.json": b'{"model_type": "llama"}', "model.safetensors": WEIGHTS}


def tar_gz(members: list[tarfile.TarInfo | tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tar.addfile(m)
                continue
            name, data = m
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def special(name: str, kind: bytes, target: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def zipped(members: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            z.writestr(info, target)
    return buf.getvalue()


@pytest.fixture
def web() -> Iterator[Mirror]:
    model = tar_gz([(f"model/{n}", d) for n, d in MODEL.items()])
    mirror = Mirror("unused/repo", {"model.tar.gz": model, "flat.zip": zipped(MODEL)})
    with running_mirror(mirror):
        yield mirror


def run(web: Mirror, name: str, tmp: Path, *flags: str):
    return download_cli(
        f"{web.cdn_url}/cdn/{name}",
        f"--cache-dir={tmp / 'cache'}",
        f"--dest={tmp / 'm'}",
        "--retries=1",
        *flags,
    )


def model_files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and p.name != MANIFEST
    }


def test_a_tar_gz_with_one_top_folder_becomes_the_model_folder(web, tmp_path) -> None:
    sha = hashlib.sha256(web.files["model.tar.gz"]).hexdigest()
    out = run(web, "model.tar.gz", tmp_path, f"--sha256={sha}")
    assert out.returncode == 0, out.stderr
    assert model_files(tmp_path / "m") == MODEL
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / "m").iterdir()} <= {0o644, 0o755}
    assert [p.name for p in (tmp_path / "cache" / ".staging").iterdir()] == []  # cleaned up


def test_a_zip_without_a_top_folder_is_the_model_folder(web, tmp_path) -> None:
    out = run(web, "flat.zip", tmp_path)
    assert out.returncode == 0, out.stderr
    assert model_files(tmp_path / "m") == MODEL


def test_a_wrong_sha256_fails_the_transfer(web, tmp_path) -> None:
    out = run(web, "model.tar.gz", tmp_path, f"--sha256={'0' * 64}")
    assert out.returncode == 5 and "sha256" in out.stderr
    assert entries(tmp_path / "cache") == []


def test_the_urls_sha256_fragment_is_checked_and_never_sent(web, tmp_path) -> None:
    sha = hashlib.sha256(web.files["model.tar.gz"]).hexdigest()
    out = run(web, f"model.tar.gz#sha256={sha}", tmp_path)
    assert out.returncode == 0, out.stderr
    assert model_files(tmp_path / "m") == MODEL
    assert all("#" not in r.path for r in web.requests)  # a fragment stays with the client
    wrong = run(web, f"model.tar.gz#sha256={'0' * 64}", tmp_path / "wrong")
    assert wrong.returncode == 5 and "sha256" in wrong.stderr
    assert entries(tmp_path / "wrong" / "cache") == []


@pytest.mark.parametrize(
    ("fragment", "flags", "said"),
    [
        ("#md5=0123", (), "may only be #sha256="),
        (f"#sha256={'A' * 64}", (), "may only be #sha256="),
        (f"#sha256={'0' * 64}", (f"--sha256={'1' * 64}",), "differ"),
    ],
    ids=["other-hash", "upper-case", "disagrees"],
)
def test_a_fragment_that_is_no_sha256_of_ours_is_refused_before_asking(
    web, tmp_path, fragment, flags, said
) -> None:
    out = run(web, f"model.tar.gz{fragment}", tmp_path, *flags)
    assert out.returncode == 2 and said in out.stderr and "InvalidSource" in out.stderr
    assert web.requests == []


def test_a_cut_archive_transfer_resumes_by_range(web, tmp_path) -> None:
    web.cut_after, web.cut_times = {"model.tar.gz": 4096}, 2  # the one-byte size probe, a GET
    out = run(web, "model.tar.gz", tmp_path)
    assert out.returncode == 0, out.stderr
    ranges = [r.range for r in web.asked("cdn", "model.tar.gz")]
    assert ranges == ["bytes=0-0", None, "bytes=4096-"]  # size, the cut answer, the rest
    assert model_files(tmp_path / "m") == MODEL


def test_the_query_of_a_presigned_url_stays_out_of_messages(web, tmp_path) -> None:
    out = download_cli(
        f"{web.cdn_url}/cdn/gone.tar.gz?X-Amz-Signature=secret", f"--cache-dir={tmp_path}"
    )
    assert out.returncode == 3 and "secret" not in out.stderr and "gone.tar.gz" in out.stderr


@pytest.mark.parametrize(
    ("archive", "said"),
    [
        (tar_gz([("model/config.json", b"{}"), ("../evil", b"x")]), "outside the model's folder"),
        (tar_gz([("/etc/evil", b"x")]), "outside the model's folder"),
        (tar_gz([("a", b"x"), special("link", tarfile.SYMTYPE, "/etc/passwd")]), "is a link"),
        (tar_gz([("a", b"x"), special("hard", tarfile.LNKTYPE, "a")]), "is a link"),
        (tar_gz([special("dev", tarfile.CHRTYPE)]), "not a regular file"),
        (tar_gz([("a", b"x"), ("./a", b"y")]), "twice"),
        (tar_gz([("zeros", bytes(2 << 20))]), "more than the 1048576 bytes allowed unpacked"),
    ],
    ids=["climbs-out", "absolute", "symlink", "hardlink", "device", "twice", "too-big"],
)
def test_hostile_tars_are_refused_and_nothing_is_written_outside(
    web, tmp_path, archive, said
) -> None:
    web.files["bad.tar.gz"] = archive
    out = run(web, "bad.tar.gz", tmp_path, "--max-bytes=1048576")
    assert out.returncode == 7, out.stderr
    assert said in out.stderr
    assert entries(tmp_path / "cache") == [] and not (tmp_path / "m").exists()
    assert not (tmp_path / "evil").exists() and not (tmp_path.parent / "evil").exists()


def test_a_zip_with_a_link_is_refused(web, tmp_path) -> None:
    web.files["bad.zip"] = zipped({"config.json": b"{}"}, links={"w": "/etc/passwd"})
    out = run(web, "bad.zip", tmp_path)
    assert out.returncode == 7 and "is a link" in out.stderr


def test_a_url_that_is_no_archive_is_refused(web, tmp_path) -> None:
    web.files["model.bin"] = b"x"
    out = run(web, "model.bin", tmp_path)
    assert out.returncode == 7 and "not an archive" in out.stderr
