"""Latency profiles: the calibrated model against its derivation, worked here by hand from the
published constants (README "Latency profiles"), and the flags that override a profile."""

from __future__ import annotations

import random
import time

import pytest
import requests

from infergw.simulator.block_hashing import BlockHasher
from infergw.simulator.block_pool import BlockPool
from infergw.simulator.config import parse_config
from infergw.simulator.engine import Engine, EngineLimits
from infergw.simulator.latency import LatencyModel, StepWork
from infergw.simulator.latency_profiles import PROFILES
from infergw.simulator.request import SamplingParams, SimRequest
from tests.conftest import free_port, running, simulator_cmd

H100 = PROFILES["llama-3.1-8b-h100"].model

# NVIDIA H100 SXM5 datasheet: dense bf16 tensor-core peak and HBM3 bandwidth.
H100_FLOPS = 989.4e12
H100_BYTES_PER_S = 3.35e12
# The profile's stated efficiencies (assumptions, README).
MFU, MBU, OVERHEAD_S = 0.4, 0.8, 1e-3
# meta-llama/Llama-3.1-8B config.json, worked out: per layer q and o are 4096 x 4096, k and v
# 4096 x 1024 (8 KV heads of 128), gate/up/down 4096 x 14336; 32 layers; LM head 128256 x 4096.
LAYER_WEIGHTS = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336
MATMUL_WEIGHTS = 32 * LAYER_WEIGHTS + 128256 * 4096
EMBEDDING_AND_NORMS = 128256 * 4096 + (2 * 32 + 1) * 4096
KV_BYTES_PER_TOKEN = 2 * 32 * 8 * 128 * 2  # K and V, 32 layers, 8 heads of 128, bf16
ATTENTION_FLOPS_PER_PAIR = 2 * 2 * 32 * 32 * 128  # QK^T and PV, 32 layers, 32 heads of 128

FLOPS = H100_FLOPS * MFU
BYTES_PER_S = H100_BYTES_PER_S * MBU


def by_hand(prefill: int, decode: int, context: int, pairs: int) -> float:
    compute = ((prefill + decode) * 2 * MATMUL_WEIGHTS + pairs * ATTENTION_FLOPS_PER_PAIR) / FLOPS
    memory = (MATMUL_WEIGHTS * 2 + context * KV_BYTES_PER_TOKEN) / BYTES_PER_S
    return OVERHEAD_S + max(compute, memory)


def decode_step(batch: int, context_each: int, model: LatencyModel = H100) -> float:
    return model.work_seconds(StepWork(0, batch, batch * context_each, batch * (context_each + 1)))


def test_the_weights_counted_are_the_published_8b():
    assert MATMUL_WEIGHTS + EMBEDDING_AND_NORMS == pytest.approx(8.03e9, rel=1e-3)


@pytest.mark.parametrize(
    "work",
    [
        StepWork(0, 1, 1000, 1001),  # one stream, bandwidth bound
        StepWork(0, 64, 64 * 2000, 64 * 2001),  # KV reads add to the weight read
        StepWork(0, 256, 256 * 100, 256 * 101),  # big batch, short context: compute bound
        StepWork(2048, 0, 0, 2048 * 2049 // 2),  # a 2k prompt: matmuls + attention
        StepWork(512, 32, 32 * 800 + 1536, 32 * 801 + 512 * 1536 + 512 * 513 // 2),
    ],
)
def test_h100_step_time_matches_the_derivation(work):
    expected = by_hand(
        work.prefill_tokens, work.decode_seqs, work.context_tokens, work.attention_pairs
    )
    assert H100.work_seconds(work) == pytest.approx(expected, rel=1e-9)


def test_h100_absolute_figures_are_in_the_stated_range():
    # Prefill: tens of thousands of tokens/s for an 8B model on one H100.
    assert 15_000 < 1 / H100.prefill_s_per_token < 40_000
    # One stream decodes at 100-200 tokens/s: ~15 GB of weights at 3.35 TB/s is 4.5 ms.
    assert 100 < 1 / decode_step(1, 500) < 200
    # A 2000-token prompt: 50-150 ms.
    assert 0.05 < H100.work_seconds(StepWork(2000, 0, 0, 2000 * 2001 // 2)) < 0.15


def test_decode_step_is_flat_then_grows_with_batch_and_context():
    batches = [1, 2, 8, 32, 64, 128, 256]
    times = [decode_step(b, 1000) for b in batches]
    assert times == sorted(times) and times[-1] > 2 * times[0]
    assert decode_step(8, 200) < 1.05 * decode_step(1, 200)  # the weight read dominates
    contexts = [100, 1000, 4000, 16000]
    times = [decode_step(16, c) for c in contexts]
    assert times == sorted(times) and times[-1] > 1.5 * times[0]
    # Long contexts of a big batch cost more than short ones, and compute bound beyond that.
    assert decode_step(256, 4000) > decode_step(256, 100) > decode_step(64, 100)


def test_prefill_to_decode_ratio():
    """A batch-1 decode step costs as much as ~100-300 prompt tokens of prefill on an H100:
    about half the GPU's ridge point (989 TFLOPS / 3.35 TB/s = 295 FLOPs a byte), as MFU is
    half of MBU and a bf16 weight is 2 bytes for 2 FLOPs."""
    ratio = decode_step(1, 500) / H100.prefill_s_per_token
    assert 100 < ratio < 300
    # The A100's ridge point is lower (312 TFLOPS / 2.04 TB/s = 153): so is the ratio.
    a100 = PROFILES["llama-3.1-8b-a100"].model
    assert 50 < decode_step(1, 500, a100) / a100.prefill_s_per_token < ratio


def test_default_profile_keeps_the_original_numbers():
    lat = parse_config([]).latency
    assert lat == LatencyModel(
        prefill_s_per_token=60e-6,
        decode_s_per_step=8e-3,
        decode_s_per_seq=0.15e-3,
        step_overhead_s=1e-3,
        kv_read_s_per_token=0.0,
        attention_s_per_pair=0.0,
        roofline=False,
        kv_transfer_s_per_block=0.1e-3,
        time_scale=1.0,
    )
    assert lat == PROFILES["sim-default"].model
    assert lat.step_seconds(1000, 0) == pytest.approx(0.061)
    assert lat.step_seconds(0, 32) == pytest.approx(0.0138)


def test_flags_override_the_profile():
    lat = parse_config(
        [
            "--sim-latency-profile",
            "llama-3.1-8b-h100",
            "--sim-prefill-us-per-token",
            "50",
            "--sim-kv-read-ns-per-token",
            "10",
            "--sim-step-overhead-ms",
            "0",
            "--sim-time-scale",
            "0.5",
        ]
    ).latency
    assert lat.prefill_s_per_token == pytest.approx(50e-6)
    assert lat.kv_read_s_per_token == pytest.approx(10e-9)
    assert lat.step_overhead_s == 0
    assert lat.time_scale == 0.5
    # The rest is the profile's.
    assert lat.decode_s_per_step == H100.decode_s_per_step
    assert lat.attention_s_per_pair == H100.attention_s_per_pair
    assert lat.roofline
    # As a Model's engine.args spell it (infergate up -- ... appends there too).
    assert parse_config(["--sim-latency-profile=llama-3.1-8b-h100"]).latency == H100
    flat = parse_config(["--sim-latency-profile", "llama-3.1-8b-h100", "--no-sim-roofline"])
    assert not flat.latency.roofline
    assert parse_config(["--sim-attention-ns-per-pair", "2"]).latency.attention_s_per_pair == (
        pytest.approx(2e-9)
    )


@pytest.mark.parametrize("flag", ["--sim-decode-ms-per-step", "--sim-kv-read-ns-per-token"])
def test_negative_latency_flags_are_refused(flag):
    with pytest.raises(SystemExit):
        parse_config([flag, "-1"])
    with pytest.raises(SystemExit):
        parse_config(["--sim-latency-profile", "no-such-gpu"])


def request(request_id: str, prompt, max_tokens: int) -> SimRequest:
    return SimRequest(
        request_id=request_id,
        prompt_token_ids=list(prompt),
        params=SamplingParams(max_tokens=max_tokens),
        rng=random.Random(0),
    )


def h100_engine(blocks: int, token_budget: int, max_model_len: int) -> Engine:
    """An engine of 16-token blocks timed by the H100 profile, up to 8 sequences a step."""
    return Engine(
        pool=BlockPool(blocks, 16),
        hasher=BlockHasher(16, "sha256", 0),
        limits=EngineLimits(8, token_budget, max_model_len, 1),
        latency=H100,
        token_texts={i: f" t{i}" for i in range(100, 200)},
    )


def test_engine_counts_context_and_attention_of_each_step():
    e = h100_engine(400, 1000, 4096)
    # A running decoder with 300 computed tokens, and a 1500-token prompt chunked at the
    # budget left (999 tokens).
    decoder = request("d", range(300), max_tokens=4)
    e.add_request(decoder)
    e._complete(e._schedule())
    assert decoder.num_computed_tokens == 300 and len(decoder.output_token_ids) == 1
    prompt = request("p", range(5000, 6500), max_tokens=1)
    e.add_request(prompt)
    step = e._schedule().work()
    assert step == StepWork(
        prefill_tokens=999,
        decode_seqs=1,
        context_tokens=300,
        attention_pairs=300 + 1 + 999 * 1000 // 2,
    )


def test_a_prefill_sharing_a_step_delays_its_decodes():
    """The interference P/D removes: with the H100 profile a decoding sequence's token takes
    one flat decode step alone, and the whole chunk's prefill time when a prompt is admitted
    into its step (chunked at the token budget)."""
    e = h100_engine(1000, 8192, 16384)
    decoder = request("d", range(300), max_tokens=8)
    e.add_request(decoder)
    e._complete(e._schedule())
    step = e._schedule()
    alone = H100.work_seconds(step.work())
    e._complete(step)
    e.add_request(request("p", range(5000, 13000), max_tokens=1))
    shared = e._schedule().work()
    assert shared.decode_seqs == 1 and shared.prefill_tokens == 8000
    assert alone < 0.008  # ~6.6 ms: the weight read
    assert H100.work_seconds(shared) > 40 * alone  # ~0.35 s for that one token


def test_simulator_prefill_takes_the_profiles_time():
    """A real simulator process with the H100 profile: the prefill step it models for a
    2000-token prompt is the derivation's, and the TTFT clients see follows it."""
    n, scale = 2000, 0.5
    port = free_port()
    cmd = simulator_cmd(
        port, "--sim-latency-profile", "llama-3.1-8b-h100", "--sim-time-scale", str(scale)
    )
    with running(cmd, ready_url=f"http://127.0.0.1:{port}/health"):
        url = f"http://127.0.0.1:{port}"
        body = {"model": "infergate-sim", "prompt": [100 + i % 1000 for i in range(n)]}
        started = time.monotonic()
        r = requests.post(url + "/v1/completions", json=body | {"max_tokens": 1}, timeout=30)
        elapsed = time.monotonic() - started
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == n
        metrics = requests.get(url + "/metrics", timeout=5).text
    values = {
        line.split(" ")[0]: float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("infergate_sim:")
    }
    assert values["infergate_sim:engine_steps_total"] == 1  # max_num_batched_tokens 8192
    modeled = values["infergate_sim:step_modeled_seconds_total"]
    expected = by_hand(n, 0, 0, n * (n + 1) // 2)
    assert modeled == pytest.approx(expected * scale, rel=1e-6)
    assert 0.05 < expected < 0.15  # ~80 ms: 2000 tokens at ~26k tokens/s
    # The simulator sleeps the modeled time; the rest is HTTP and a loaded machine.
    assert modeled <= elapsed < modeled + 2.0


def test_kv_pull_is_the_block_bytes_over_the_link():
    """Llama-3.1-8B keeps 128 KiB of KV a token (2 × 32 layers × 8 KV heads × 128 × 2 bytes),
    so a 16-token block is 2 MiB; at 80 % of 400 Gb/s (H100 nodes' NDR InfiniBand) that is
    52 µs, at 80 % of 200 Gb/s (A100 nodes' HDR) 105 µs."""
    block = 2 * 32 * 8 * 128 * 2 * 16
    assert block == 2 * 1024 * 1024
    assert H100.kv_transfer_s_per_block == pytest.approx(block / (0.8 * 50e9))
    assert H100.kv_transfer_s_per_block == pytest.approx(52.4e-6, rel=1e-3)
    a100 = PROFILES["llama-3.1-8b-a100"].model
    assert a100.kv_transfer_s_per_block == pytest.approx(104.9e-6, rel=1e-3)


def test_kv_pull_flag_overrides_the_profile():
    cfg = parse_config(["--sim-latency-profile", "llama-3.1-8b-h100"])
    assert cfg.latency.kv_transfer_s_per_block == H100.kv_transfer_s_per_block
    cfg = parse_config(
        ["--sim-latency-profile", "llama-3.1-8b-h100", "--sim-kv-transfer-ms-per-block", "2"]
    )
    assert cfg.latency.kv_transfer_s_per_block == pytest.approx(2e-3)
