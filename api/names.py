"""Names that more than one part of the system must spell the same: labels and headers.

The picker, the connector sidecar, the controllers and the local stack each read or write
these; one definition here keeps them from drifting. Like the rest of the API package, it
imports nothing of ours.
"""

# ---- pod labels -------------------------------------------------------------------------------

# The engine a pod runs (vllm, sglang): which metric names the picker and autoscaler scrape.
ENGINE_LABEL = "inference.networking.k8s.io/engine-type"

# What the controllers put on a ModelInfer's pods, and select them by.
MODEL_LABEL = "infergate.io/model"
MODELINFER_LABEL = "infergate.io/modelinfer"
GROUP_LABEL = "infergate.io/group"  # pairs a group's prefill and decode pods
ROLE_INDEX_LABEL = "infergate.io/role-index"
ENTRY_LABEL = "infergate.io/entry"
REVISION_LABEL = "infergate.io/revision"

# What the controllers set in every container of a ModelInfer's pods (Kthena's names): the pods
# of its role instance, its entry's address (the headless Service named after the entry pod)
# and its index there (0: the entry); a multi-node engine's flags refer to them.
GROUP_SIZE_ENV = "GROUP_SIZE"
ENTRY_ADDRESS_ENV = "ENTRY_ADDRESS"
WORKER_INDEX_ENV = "WORKER_INDEX"

# A pod's prefill/decode role (set by the controllers, read by the picker's pd filters and the
# connector's allowlist), and its values: `both` serves either leg.
ROLE_LABEL = "infergate.io/role"
PREFILL = "prefill"
DECODE = "decode"
BOTH = "both"

# What a Service of ours serves, for the shipped ServiceMonitors to select by
# (gateway-manifests/observability/monitors.yaml): the picker's metrics Service carries
# COMPONENT_LABEL=PICKER_COMPONENT, whichever Model (or hand-written pool) it is for.
COMPONENT_LABEL = "app.kubernetes.io/component"
PICKER_COMPONENT = "endpoint-picker"
# A serving pod's sidecar that serves metrics of its own (the P/D connector's
# /connector/metrics), for the shipped PodMonitor to select by.
SIDECAR_LABEL = "infergate.io/sidecar"
CONNECTOR_SIDECAR = "connector"

# ---- engine ports and states ------------------------------------------------------------------

# An engine's KV-event PUB (per-pod mode binds it; central mode's picker binds its SUB there)
# and its replay socket: what the controllers write into engines' --kv-events-config and the
# picker and the local stack expect.
KV_EVENTS_PORT = 5557
KV_REPLAY_PORT = 5600

# A container standalone mode cannot run (its engine is not installed here): the waiting
# reason it reports, as a kubelet reports ErrImageNeverPull for an image it does not have.
ENGINE_NOT_INSTALLED = "EngineNotInstalled"
# A pod whose weights could not be downloaded: its init container `infergate download` failed.
DOWNLOAD_FAILED = "DownloadFailed"
# A pod whose weights are on their way: its download init container is running.
DOWNLOADING_WEIGHTS = "DownloadingWeights"
# A picker's metrics and debug pages: the container port and its name, by which the
# autoscaler and `infergate status` find each replica's (cluster/picker_pods.py).
PICKER_METRICS_PORT = 9090
PICKER_METRICS_PORT_NAME = "http-metrics"
# The runtime sidecar's port (infergate runtime: /ready, /status) in every pod that loads LoRA
# adapters at run time.
RUNTIME_PORT = 8300

# What a download (and the picker's tokenizer fetch, in a cluster or the local stack) may see
# of a Model's env: the credentials and endpoints of its source, nothing else of the engine's.
FETCH_ENV = (
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "HF_ENDPOINT",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
)

# ---- example documents for the local stack alone -----------------------------------------------

# A local S3 the stack starts for an example and fills with its files (stack/object_store.py);
# the standalone controllers skip it (controllers/manifests.py).
LOCAL_OBJECT_STORE_KIND = "LocalObjectStore"

# ---- install objects the controllers read -----------------------------------------------------

# The install's Gateway-wide EnvoyPatchPolicy (gateway-manifests/bbr/picker-filter.yaml) that
# adds the picker filter every Model's own patch overrides: a Model is reachable only with it.
PICKER_FILTER_POLICY = "infergate-picker-filter"

# ---- request headers --------------------------------------------------------------------------

# The verified user Envoy's auth filters set (after removing any client copy).
USER_HEADER = "x-infergate-user"

# The prefill pods the picker chose, as a comma-separated host:port list, for the decode pod's
# connector sidecar. Only the picker sets it: the gateway removes a client's copy.
PREFILLER_HEADER = "x-prefiller-host-port"

# The Gateway API Inference Extension's protocol: where the picker sends a request (set by the
# picker, in a header and in envoy.lb metadata), the subset a gateway may offer, and the one
# that served it.
DESTINATION_HEADER = "x-gateway-destination-endpoint"
SUBSET_HEADER = "x-gateway-destination-endpoint-subset"
SERVED_HEADER = "x-gateway-destination-endpoint-served"

# Set by the gateway, never by a client (Envoy removes client copies before the picker):
# the engine model a request is rewritten to, and the request's priority and fairness flow.
MODEL_REWRITE_HEADER = "x-gateway-model-name-rewrite"
OBJECTIVE_HEADER = "x-gateway-inference-objective"
FAIRNESS_ID_HEADER = "x-gateway-inference-fairness-id"

# A request's id: Envoy sets one (or keeps the client's); the picker's and sidecar's log lines
# name it (api/log_context.py) and the P/D sidecar sends it on both legs.
REQUEST_ID_HEADER = "x-request-id"
# W3C Trace Context: the trace a request belongs to (the log lines' trace id).
TRACEPARENT_HEADER = "traceparent"

# A client's session, which the session-affinity scorer keeps on one pod.
SESSION_HEADER = "x-session-id"

# The sidecar's default --pool-file. Standalone mode's kubelet sets it in every container, as a
# kubelet sets KUBERNETES_SERVICE_HOST: there the pool file stands in for the API server.
POOL_FILE_ENV = "INFERGATE_POOL_FILE"

# Set by the body-based router (bbr/) in front of the pickers, never by a client (the router
# overwrites or removes a client's copy): the InferencePool that serves the body's `model`
# (a ModelRoute name, a LoRA adapter or a Model's served name, resolved to its pool). Every
# Model's HTTPRoute matches it against its pool's name, so many Models share one Gateway and
# the same paths; the router clears Envoy's route cache after setting it.
MODEL_NAME_HEADER = "x-gateway-model-name"

# The picker's demand gauge: requests it holds because no endpoint of its pool is ready
# (epp/capacity_wait.py); the autoscaler sums it over every picker replica of a pool
# (controllers/picker_demand.py) to scale a pool up from zero.
PICKER_DEMAND_METRIC = "infergate_epp_pool_waiting_for_capacity"
