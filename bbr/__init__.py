"""Body-based routing: Envoy's ext_proc server in front of the pickers, for many Models behind
one Gateway. Every Model's HTTPRoute serves the same paths, so the router reads the body's
`model` (with the picker's decoding), resolves it — ModelRoute names, LoRA adapters, Models'
served names — to the InferencePool that serves it (`model_pools.py`, over the picker's route
table), and puts that pool's name in `x-gateway-model-name`, which the HTTPRoutes match on.

`app.py` starts it; `extproc.py` is the stream Envoy opens per request; `sources.py` reads the
objects (files or the API server). It stands on `api/`, `cluster/` and epp's body decoding and
route table; docs/architecture.md has the map.
"""
