"""Names that more than one part of the system must spell the same: labels and headers.

The picker, the connector sidecar and the controllers each read or write these; one definition
here keeps them from drifting. Like the rest of the API package, it imports nothing of ours.
"""

# A pod's prefill/decode role (set by the controllers, read by the picker's pd filters and the
# connector's allowlist), and its values: `both` serves either leg.
ROLE_LABEL = "infergate.io/role"
PREFILL = "prefill"
DECODE = "decode"
BOTH = "both"

# The prefill pods the picker chose, as a comma-separated host:port list, for the decode pod's
# connector sidecar. Only the picker sets it: the gateway removes a client's copy.
PREFILLER_HEADER = "x-prefiller-host-port"
