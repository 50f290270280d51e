"""The model names the simulator answers to: the served names of the base model and the LoRA
adapters loaded at start or at run time."""

from __future__ import annotations

from dataclasses import dataclass

from infergw.simulator import responses
from infergw.simulator.config import SimulatorConfig
from infergw.simulator.protocol import ApiError


@dataclass(slots=True)
class LoraAdapter:
    lora_id: int
    name: str
    path: str


class ServedModels:
    def __init__(self, cfg: SimulatorConfig) -> None:
        self.cfg = cfg
        self.loras: dict[str, LoraAdapter] = {}
        self._next_lora_id = 1  # vLLM numbers adapters from 1; ids are never reused
        for module in cfg.lora_modules:
            self.add_lora(module.name, module.path)

    @property
    def served_names(self) -> list[str]:
        return self.cfg.served_model_name or [self.cfg.model_name]

    def resolve(self, name: str | None) -> tuple[str, LoraAdapter | None]:
        """The model name to answer with and the adapter to run; 404 for an unknown name."""
        if name is None or name in self.served_names:
            return name or self.cfg.model_name, None
        if name in self.loras:
            return name, self.loras[name]
        raise ApiError(404, f"The model `{name}` does not exist.", "model")

    def add_lora(self, name: str, path: str) -> LoraAdapter:
        adapter = LoraAdapter(self._next_lora_id, name, path)
        self._next_lora_id += 1
        self.loras[name] = adapter
        return adapter

    def remove_lora(self, name: str) -> bool:
        """False when no adapter has that name."""
        return self.loras.pop(name, None) is not None

    def cards(self, max_model_len: int) -> list[dict]:
        """GET /v1/models' entries: the base model's names, then the adapters."""
        created = responses.now()
        root = self.cfg.model or self.cfg.model_id or self.cfg.model_name
        base = [
            responses.model_card(name, created, root, None, max_model_len)
            for name in self.served_names
        ]
        adapters = [
            responses.model_card(a.name, created, a.path, self.cfg.model_name, None)
            for a in self.loras.values()
        ]
        return base + adapters
