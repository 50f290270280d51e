"""The endpoint picker: Envoy's ext_proc server that chooses, per request, the pod that serves it.

`app.py` starts it; `extproc.py` is the stream Envoy opens per request; `director.py` takes a
parsed request (`request.py`) through routing, the gatekeeper (rate limits, flow control) and
scheduling (`scheduling/`). It stands on `api/` and `kvindex/`; docs/architecture.md has the map.
"""
