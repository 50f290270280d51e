"""A random-weight PEFT LoRA adapter for the tiny Llama of the real-engine tests, as PEFT
saves one: `adapter_config.json` and `adapter_model.safetensors`.

The test venv has numpy but not the safetensors package, so the file is written here by the
format's own rules: an 8-byte little-endian header length, a JSON header naming each tensor's
dtype, shape and byte range (padded with spaces to 8 bytes), then the raw little-endian data.
The shapes come from the model's config.json: q_proj maps hidden to heads * head_dim, v_proj
hidden to kv_heads * head_dim; lora_A is (r, in), lora_B (out, r)."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TARGETS = ("q_proj", "v_proj")
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class Shapes:
    """What an adapter's tensors depend on, read from a model's config.json."""

    layers: int
    hidden: int
    out: dict[str, int]  # target module -> its output size

    @classmethod
    def of(cls, model_dir: Path) -> Shapes:
        c = json.loads((model_dir / "config.json").read_text())
        head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
        kv_heads = c.get("num_key_value_heads") or c["num_attention_heads"]
        return cls(
            layers=c["num_hidden_layers"],
            hidden=c["hidden_size"],
            out={"q_proj": c["num_attention_heads"] * head_dim, "v_proj": kv_heads * head_dim},
        )


def safetensors_bytes(tensors: dict[str, np.ndarray]) -> bytes:
    """The safetensors encoding of float32 tensors."""
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    chunks, offset = [], 0
    for name, array in tensors.items():
        data = np.ascontiguousarray(array, dtype="<f4").tobytes()
        header[name] = {
            "dtype": "F32",
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


def lora_tensors(shapes: Shapes, rank: int, seed: int) -> dict[str, np.ndarray]:
    """PEFT's names and shapes, small random values (B non-zero, so the adapter changes the
    model's output, unlike PEFT's own initialisation)."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(shapes.layers):
        for module in TARGETS:
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = rng.normal(0, 0.02, (rank, shapes.hidden))
            tensors[f"{prefix}.lora_B.weight"] = rng.normal(0, 0.02, (shapes.out[module], rank))
    return tensors


def adapter_config(base_model: Path, rank: int) -> dict:
    """What vLLM's PEFTHelper reads (r, lora_alpha, target_modules required; bias "none"),
    with the rest of the fields PEFT writes."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_model),
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": list(TARGETS),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
    }


def write_adapter(directory: Path, base_model: Path, rank: int = 8, seed: int = 0) -> Path:
    """A LoRA adapter of rank `rank` for the model at `base_model`, in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG).write_text(json.dumps(adapter_config(base_model, rank), indent=2))
    tensors = lora_tensors(Shapes.of(base_model), rank, seed)
    (directory / WEIGHTS).write_bytes(safetensors_bytes(tensors))
    return directory


def write_corrupt_adapter(directory: Path, base_model: Path) -> Path:
    """A valid config beside a weights file that is not safetensors (a cut download): a
    header length far past the file's end."""
    write_adapter(directory, base_model)
    data = (directory / WEIGHTS).read_bytes()
    (directory / WEIGHTS).write_bytes(struct.pack("<Q", 1 << 40) + data[8:64])
    return directory
