"""`infergate runtime`: the sidecar beside an engine that keeps its LoRA adapters as the Model
says, loading and unloading them through the engine's own API without a restart (sidecar.py)."""
