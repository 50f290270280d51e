"""Named latency profiles: the simulator's original numbers, and models calibrated to a GPU.

A calibrated profile is derived, not fitted: published model shapes (the checkpoint's
config.json) and GPU peaks (NVIDIA's datasheets) give the FLOPs and bytes of a step, and two
efficiency factors say how much of the peaks a serving engine reaches. README "Latency
profiles" lists the sources and which numbers are assumptions.

Prefill is compute bound: 2 FLOPs per matmul weight per token, at MFU × peak bf16 FLOPS.
Decode is bandwidth bound: all matmul weights are read once per step, and each sequence
reads its context's KV, at MBU × peak HBM bandwidth. A decode token costs the same matmul
FLOPs as a prompt token, so a big enough batch turns compute bound (latency.py's roofline).
"""

from __future__ import annotations

from dataclasses import dataclass

from infergw.simulator.latency import LatencyModel

BF16_BYTES = 2


@dataclass(frozen=True, slots=True)
class ModelShape:
    """A Llama-style decoder's sizes, as its config.json gives them."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    bytes_per_param: int = BF16_BYTES

    @property
    def matmul_params(self) -> int:
        """Weights every token multiplies: q/k/v/o, gate/up/down, and the untied LM head. The
        input embedding is a lookup (no FLOPs, only the batch's rows are read); norms are
        negligible."""
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        attention = h * (self.num_heads * self.head_dim) * 2 + h * kv * 2  # q, o; k, v
        mlp = 3 * h * self.intermediate_size
        return self.num_layers * (attention + mlp) + self.vocab_size * h

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.bytes_per_param

    @property
    def attention_flops_per_pair(self) -> int:
        """QKᵀ and PV: 2 FLOPs each per head dimension of every query head, in every layer."""
        return 4 * self.num_layers * self.num_heads * self.head_dim


@dataclass(frozen=True, slots=True)
class Gpu:
    dense_bf16_flops: float  # tensor-core peak without sparsity
    hbm_bytes_per_s: float


@dataclass(frozen=True, slots=True)
class Efficiency:
    """How much of the GPU's peaks a serving engine reaches, and its per-step CPU cost."""

    mfu: float  # model FLOPs utilisation of prefill (and of compute-bound decode)
    mbu: float  # model bandwidth utilisation of decode
    step_overhead_s: float
    link_utilisation: float = 0.8  # of the KV link's line rate a transfer reaches


@dataclass(frozen=True, slots=True)
class KvLink:
    """The network a decode pod pulls a prefill pod's KV over (P/D disaggregation)."""

    bytes_per_s: float  # line rate, one direction


# vLLM's default KV block on CUDA: the unit a P/D pull moves (simulator/kv_transfer.py).
KV_BLOCK_TOKENS = 16


@dataclass(frozen=True, slots=True)
class LatencyProfile:
    name: str
    summary: str
    model: LatencyModel


def derive(model: ModelShape, gpu: Gpu, eff: Efficiency, link: KvLink) -> LatencyModel:
    """The roofline latency model of `model` on `gpu` at the efficiencies `eff`, its P/D KV
    pulls over `link` (a block of KV_BLOCK_TOKENS tokens' KV at the link's usable rate)."""
    flops = gpu.dense_bf16_flops * eff.mfu
    bandwidth = gpu.hbm_bytes_per_s * eff.mbu
    token_s = 2 * model.matmul_params / flops
    block_bytes = model.kv_bytes_per_token * KV_BLOCK_TOKENS
    return LatencyModel(
        prefill_s_per_token=token_s,
        decode_s_per_seq=token_s,
        decode_s_per_step=model.matmul_params * model.bytes_per_param / bandwidth,
        step_overhead_s=eff.step_overhead_s,
        kv_read_s_per_token=model.kv_bytes_per_token / bandwidth,
        attention_s_per_pair=model.attention_flops_per_pair / flops,
        roofline=True,
        kv_transfer_s_per_block=block_bytes / (link.bytes_per_s * eff.link_utilisation),
    )


# meta-llama/Llama-3.1-8B config.json (8.03e9 parameters; 7.50e9 of them in matmuls).
LLAMA_3_1_8B = ModelShape(
    hidden_size=4096,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    intermediate_size=14336,
    vocab_size=128256,
)
# NVIDIA datasheets: H100 SXM5 80 GB (HBM3), A100 SXM4 80 GB (HBM2e); dense bf16.
H100_SXM = Gpu(dense_bf16_flops=989.4e12, hbm_bytes_per_s=3.35e12)
A100_SXM_80GB = Gpu(dense_bf16_flops=312e12, hbm_bytes_per_s=2.039e12)
# Assumptions, not measurements (README "Latency profiles"): MBU 0.8 sits below the ~0.9 the
# vLLM v0.6.0 blog's profile implies (13 ms a token, 38 % of it on the GPU: ~4.9 ms for
# 15 GB of weights); MFU 0.4 is a round figure for a whole forward pass at prefill shapes;
# 1 ms is the per-step scheduling and launch cost an engine does not hide behind the GPU.
# link_utilisation 0.8 (the default) is likewise assumed: RDMA reaches most of its line rate
# on multi-MiB transfers, less the protocol's overhead and NIXL's bookkeeping.
VLLM_EFFICIENCY = Efficiency(mfu=0.4, mbu=0.8, step_overhead_s=1e-3)
# NVIDIA DGX H100 / DGX A100 user guides: one ConnectX-7 400 Gb/s (NDR) and one ConnectX-6
# 200 Gb/s (HDR) InfiniBand port per GPU, the path a prefill pod on another node's KV takes.
NDR_400G = KvLink(bytes_per_s=400e9 / 8)
HDR_200G = KvLink(bytes_per_s=200e9 / 8)

DEFAULT_PROFILE = "sim-default"
PROFILES: dict[str, LatencyProfile] = {
    p.name: p
    for p in (
        LatencyProfile(
            DEFAULT_PROFILE,
            "the simulator's original, uncalibrated numbers (additive model)",
            LatencyModel(),
        ),
        LatencyProfile(
            "llama-3.1-8b-h100",
            "Llama-3.1-8B bf16 on one H100 SXM with vLLM (roofline model)",
            derive(LLAMA_3_1_8B, H100_SXM, VLLM_EFFICIENCY, NDR_400G),
        ),
        LatencyProfile(
            "llama-3.1-8b-a100",
            "Llama-3.1-8B bf16 on one A100 SXM 80 GB with vLLM (roofline model)",
            derive(LLAMA_3_1_8B, A100_SXM_80GB, VLLM_EFFICIENCY, HDR_200G),
        ),
    )
}
