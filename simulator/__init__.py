"""vLLM-compatible model server simulator (no GPUs)."""
