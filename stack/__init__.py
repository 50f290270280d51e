"""The local stack as a library: model-server pods, the picker and Envoy as real processes
(local.py), the example directories they run (example.py), Envoy's config and auth (envoy_config.py,
auth.py), supervision (supervise.py), readiness waits and free ports. The launcher (`infergate
up`), the benchmarks and the tests use it; it never imports the launcher."""
