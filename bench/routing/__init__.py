"""Routing quality: the same fleet, workloads and seed through infergate's configurations,
vllm-router, sglang-router and an oracle bound (`infergate bench routing`)."""
