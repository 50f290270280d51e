"""The decode pod's connector sidecar: an HTTP proxy in front of the local engine.

Without `x-prefiller-host-port` it passes requests through unchanged. With it, completions and
chat completions run in two legs — a prefill on a prefill pod and the decode on the local
engine — rewritten for the KV connector the engines use (nixl, mooncake, http, lmcache, sglang).
Only prefill pods of the sidecar's own InferencePool are ever called (`allowlist`).
"""

from infergw.connector.options import ConnectorOptions, parse_options
from infergw.connector.server import ConnectorProxy

__all__ = ["ConnectorOptions", "ConnectorProxy", "parse_options"]
