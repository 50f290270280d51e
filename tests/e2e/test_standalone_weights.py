"""Standalone mode downloads a Model's weights before its engine starts: an `hf://` Model (a
vLLM Model whose command is the simulator, so it runs here) gets its init container, which
fetches the snapshot from a Hub mirror of our own over real HTTP (the Model's HF_ENDPOINT)
into the cache, the Model's Active condition saying how far meanwhile; the engine starts on the
link and serves. A Model whose repository does not
exist never starts, and its Failed condition says why in the download's words. A Model whose
modelURI is an http(s) archive is unpacked before its engine starts."""

from __future__ import annotations

import asyncio
import io
import os
import random
import re
import subprocess
import sys
import tarfile

import aiohttp
import pytest
import yaml

from infergw.cluster.store import MODEL, POD
from infergw.controllers.app import Standalone
from tests.e2e.standalone_helpers import wait_for_cluster
from tests.fetch.hub_mirror import Mirror, running_mirror
from tests.paths import DEFAULT_MODEL

pytestmark = pytest.mark.slow
WEIGHTS = random.Random(5).randbytes(1 << 20)
HOW_FAR = re.compile(r"\d+% \(\d+(\.\d)? \w+ of \d+\.\d MiB, [^)]+/s\), file \d+ of \d+")


def hf_model(name: str, repo: str, hub: str) -> dict:
    return {
        "apiVersion": "workload.infergate.io/v1alpha1",
        "kind": "Model",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "modelURI": f"hf://{repo}",
            "image": "vllm/vllm-openai",  # a real engine's: its weights are downloaded
            "engine": {
                "type": "vLLM",
                "command": [sys.executable, "-m", "infergw.simulator"],
                "args": ["--sim-time-scale=0"],
            },
            "replicas": 1,
            "backend": {"aggregated": {}},
            "env": [{"name": "HF_ENDPOINT", "value": hub}],
        },
    }


def condition(model: dict, kind: str) -> dict:
    return next(
        (c for c in (model.get("status") or {}).get("conditions") or [] if c["type"] == kind), {}
    )


async def test_weights_are_downloaded_before_the_engine_and_failures_named(tmp_path) -> None:
    files = {p.name: p.read_bytes() for p in DEFAULT_MODEL.iterdir() if p.is_file()}
    mirror = Mirror("org/tiny", {**files, "model.safetensors": WEIGHTS}, lfs={"model.safetensors"})
    mirror.drip = 0.5  # the weights take about 8 s to arrive: long enough to be seen doing so
    with running_mirror(mirror):
        manifests = tmp_path / "manifests"
        manifests.mkdir()
        docs = [
            hf_model("tiny", "org/tiny", mirror.hub_url),
            hf_model("gone", "org/gone", mirror.hub_url),
        ]
        (manifests / "models.yaml").write_text(yaml.safe_dump_all(docs))
        state = tmp_path / "state"
        app = await Standalone(
            manifests, state, tmp_path / "pool.yaml", weights_cache_dir=tmp_path / "cache"
        ).start()
        store = app.store
        try:

            async def tiny_downloading():
                m = await store.get(MODEL, "default", "tiny")
                active = condition(m or {}, "Active")
                downloading = active.get("reason") == "DownloadingWeights"
                return active if downloading and HOW_FAR.search(active["message"]) else None

            # How far it is, read from the download's log as the local runtime keeps it.
            active = await wait_for_cluster(tiny_downloading, "the Model to say how far")
            said = active["message"]
            assert "is downloading its weights: container weights running since" in said

            async def tiny_ready():
                m = await store.get(MODEL, "default", "tiny")
                return (m.get("status") or {}).get("readyReplicas") == 1

            await wait_for_cluster(tiny_ready, "the downloaded Model to serve")
            [pod], _ = await store.list(POD, "default", {"infergate.io/model": "tiny"})
            link = (state / "models").resolve() / "default" / "tiny" / "base"
            assert f"--model={link}" in pod["spec"]["containers"][0]["args"]
            assert (
                link.is_symlink()
                and link.resolve().parent == (tmp_path / "cache" / "entries").resolve()
            )
            assert (link / "model.safetensors").read_bytes() == WEIGHTS
            assert len(mirror.asked("cdn", "model.safetensors")) == 1
            init = pod["status"]["initContainerStatuses"][0]
            assert init["name"] == "weights" and init["state"]["terminated"]["exitCode"] == 0
            async with aiohttp.ClientSession() as session:
                url = f"http://{pod['status']['podIP']}:8000/v1/models"
                async with session.get(url) as resp:
                    assert (await resp.json())["data"][0]["id"] == "tiny"

            async def gone_failed():
                m = await store.get(MODEL, "default", "gone")
                failed = condition(m, "Failed")
                return failed if failed.get("status") == "True" else None

            failed = await wait_for_cluster(gone_failed, "the missing Model's Failed condition")
            assert failed["reason"] == "DownloadFailed"
            assert "SourceNotFound" in failed["message"] and "org/gone" in failed["message"]
            gone = await store.get(MODEL, "default", "gone")
            assert condition(gone, "Ready")["reason"] == "DownloadFailed"
            [pod], _ = await store.list(POD, "default", {"infergate.io/model": "gone"})
            assert pod["status"]["phase"] == "Pending"
        finally:
            await app.stop()


async def test_an_https_archive_model_is_unpacked_before_the_engine(tmp_path) -> None:
    """A Model whose modelURI is an archive URL (the CRD accepts http(s)://): the init
    container downloads and unpacks it, the engine serves from the unpacked folder."""
    files = {p.name: p.read_bytes() for p in DEFAULT_MODEL.iterdir() if p.is_file()}
    mirror = Mirror("org/unused", {"tiny.tar.gz": tar_gz(files)})
    with running_mirror(mirror):
        manifests = tmp_path / "manifests"
        manifests.mkdir()
        doc = hf_model("tiny", "org/unused", mirror.hub_url)
        doc["spec"]["modelURI"] = f"{mirror.cdn_url}/cdn/tiny.tar.gz"
        (manifests / "models.yaml").write_text(yaml.safe_dump(doc))
        state = tmp_path / "state"
        app = await Standalone(
            manifests, state, tmp_path / "pool.yaml", weights_cache_dir=tmp_path / "cache"
        ).start()
        try:

            async def ready():
                m = await app.store.get(MODEL, "default", "tiny")
                return (m.get("status") or {}).get("readyReplicas") == 1

            await wait_for_cluster(ready, "the Model from an archive to serve")
            link = (state / "models").resolve() / "default" / "tiny" / "base"
            assert (link / "tokenizer.json").read_bytes() == files["tokenizer.json"]
            assert len(mirror.asked("cdn", "tiny.tar.gz")) >= 1
        finally:
            await app.stop()


def tar_gz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"tiny/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


async def test_a_pvc_model_is_read_from_its_claim_folder_never_written(tmp_path) -> None:
    """`pvc://CLAIM/PATH` in standalone mode: the claim is `<pvc root>/CLAIM`; the engine
    serves a copy in the weights cache (the claim's files are only read, as through a
    read-only mount), and a Model whose claim folder is missing fails, naming it."""
    claim = tmp_path / "pvc" / "models-claim" / "llm" / "tiny"
    claim.mkdir(parents=True)
    for p in DEFAULT_MODEL.iterdir():
        if p.is_file():
            (claim / p.name).write_bytes(p.read_bytes())
    before = {p.name: p.stat().st_mtime_ns for p in claim.iterdir()}
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    tiny = hf_model("tiny", "org/unused", "http://127.0.0.1:9")
    tiny["spec"]["modelURI"] = "pvc://models-claim/llm/tiny"
    lost = hf_model("lost", "org/unused", "http://127.0.0.1:9")
    lost["spec"]["modelURI"] = "pvc://no-such-claim/llm"
    (manifests / "models.yaml").write_text(yaml.safe_dump_all([tiny, lost]))
    state = tmp_path / "state"
    app = await Standalone(
        manifests,
        state,
        tmp_path / "pool.yaml",
        weights_cache_dir=tmp_path / "cache",
        pvc_root=tmp_path / "pvc",
    ).start()
    try:

        async def ready():
            m = await app.store.get(MODEL, "default", "tiny")
            return (m.get("status") or {}).get("readyReplicas") == 1

        await wait_for_cluster(ready, "the Model from a claim to serve")
        [pod], _ = await app.store.list(POD, "default", {"infergate.io/model": "tiny"})
        [init] = pod["spec"]["initContainers"]
        assert f"--pvc-root={(tmp_path / 'pvc').resolve()}" in init["args"]
        link = (state / "models").resolve() / "default" / "tiny" / "base"
        assert link.resolve().parent == (tmp_path / "cache" / "entries").resolve()
        assert (link / "tokenizer.json").read_bytes() == (claim / "tokenizer.json").read_bytes()
        assert {p.name: p.stat().st_mtime_ns for p in claim.iterdir()} == before
        # the runtime holds the entry its engine reads: a prune, long after, leaves it
        use = tmp_path / "cache" / ".locks" / f"{link.resolve().name}.use"
        os.utime(use, (1, 1))
        pruned = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "infergw.fetch.download", "--prune",
             f"--cache-dir={tmp_path / 'cache'}"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert pruned.returncode == 0 and pruned.stdout == "", pruned.stderr
        assert (link / "tokenizer.json").is_file()

        async def lost_failed():
            m = await app.store.get(MODEL, "default", "lost")
            failed = condition(m or {}, "Failed")
            return failed if failed.get("status") == "True" else None

        failed = await wait_for_cluster(lost_failed, "the Failed condition of a missing claim")
        assert failed["reason"] == "DownloadFailed"
        assert "SourceNotFound: pvc://no-such-claim/llm: no such folder" in failed["message"]
        assert str((tmp_path / "pvc" / "no-such-claim" / "llm").resolve()) in failed["message"]
    finally:
        await app.stop()
