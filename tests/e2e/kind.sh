#!/usr/bin/env bash
# The cluster path on a real cluster (kind, or any you can spare), step by step as the README's
# "Install" and "A Model in a cluster" say: `infergate install` (the controllers in the cluster,
# their webhook, our CRDs and the Gateway-side objects), a simulator Model with `kubectl apply`,
# its picker Deployment Available and its `Reachable` condition, a chat completion through the
# Gateway, then `kubectl scale modelinfer` and deleting the Model takes everything it made.
#
#   IMAGE=ghcr.io/infergate/infergate:dev KUBECONFIG=~/.kube/config tests/e2e/kind.sh
#       IMAGE runs the controllers, every Model's picker and the simulator pods (for kind:
#       build the Dockerfile and `kind load docker-image $IMAGE` first).
#   tests/e2e/kind.sh --print-manifests
#       print the Model and policy it applies, and touch no cluster.
#   tests/e2e/kind.sh --print-install
#       print the install it applies (before leaving out the kinds a cluster does not serve),
#       and touch no cluster.
#
# A Gateway controller: Envoy Gateway with Envoy AI Gateway's InferencePool backend (the
# README's recipe, gateway-manifests/README.md "Order" 0). Without one (no gateway.envoyproxy.io
# API) the script says so, applies the Gateway API CRDs alone if they are missing
# ($GATEWAY_API_CRDS), and checks everything up to the Model's `Reachable` reason
# `RouteNotSeen`: nothing reports on the route, so no request is sent. Envoy Gateway without
# AI Gateway (no aigateway.envoyproxy.io API): up to `RouteRefsUnresolved`.
# Without cert-manager, the install's cert-manager objects are left out (the script names
# each); the controllers make the pickers' certificates themselves.
#
# Environment: IMAGE (default ghcr.io/infergate/infergate:latest); NAMESPACE for the Gateway
# side and the Model (default infergate-e2e); TIMEOUT, seconds per wait (default 300: image
# pulls); PYTHON (default .venv/bin/python); KEEP=1 leaves it all; GATEWAY_API_CRDS, the
# Gateway API CRDs applied where the cluster has none.
# Exits non-zero with a message saying what did not happen, after printing what it saw.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
IMAGE=${IMAGE:-ghcr.io/infergate/infergate:latest}
NAMESPACE=${NAMESPACE:-infergate-e2e}
TIMEOUT=${TIMEOUT:-300}
KEEP=${KEEP:-}
GATEWAY_API_CRDS=${GATEWAY_API_CRDS:-https://github.com/kubernetes-sigs/gateway-api/releases/download/v1.3.0/standard-install.yaml}
SYSTEM_NS=infergate-system
GATEWAY=inference-gateway
GATEWAY_HOST=inference.example.com  # the name the Gateway's test certificate is for
MODEL=e2e-sim
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi

# `infergate` from this checkout
infergate() {
    "$PYTHON" -c 'import sys; from infergw.cli import main; sys.exit(main())' "$@"
}

# The Model: one aggregated simulator pod per serving group. A Model owns its ModelInfer's
# replica count unless it autoscales, so this one autoscales with a policy that never scales
# down (scaleDown 0 instances, 0 percent) and only scales up past 1000 waiting requests: a
# `kubectl scale` of its ModelInfer then holds.
manifests() {
    cat <<EOF
apiVersion: workload.infergate.io/v1alpha1
kind: AutoScalingPolicy
metadata:
  name: $MODEL-hold
  namespace: $NAMESPACE
spec:
  metrics:
  - metricName: vllm:num_requests_waiting
    targetValue: 1000
  behavior:
    scaleDown:
      instances: 0
      percent: 0
---
apiVersion: workload.infergate.io/v1alpha1
kind: Model
metadata:
  name: $MODEL
  namespace: $NAMESPACE
spec:
  modelURI: file:///opt/infergate/models/infergate-sim
  servedModelName: $MODEL
  image: $IMAGE
  engine:
    type: Simulator
  resources:
    requests: {cpu: 50m, memory: 128Mi}
  replicas: 1
  backend:
    aggregated:
      replicas: 1
  autoscaling:
    minReplicas: 1
    maxReplicas: 3
    policyRef:
      name: $MODEL-hold
EOF
}

# The install, as `infergate install` prints it, running IMAGE: the controllers, and through
# their --picker-image every Model's picker.
install_stream() {
    infergate install --namespace "$NAMESPACE" --gateway "$GATEWAY" | sed \
        -e "s|image: ghcr.io/infergate/infergate:latest|image: $IMAGE|" \
        -e "s|imagePullPolicy: Always|imagePullPolicy: IfNotPresent|" \
        -e "s|^\( *\)- --mode=kubernetes$|&\n\1- --picker-image=$IMAGE|"
}

case "${1:-}" in
    --print-manifests) manifests; exit 0 ;;
    --print-install) install_stream; exit 0 ;;
    "") ;;
    *) echo "usage: $0 [--print-manifests | --print-install]" >&2; exit 2 ;;
esac

WORK=$(mktemp -d)
CLUSTER_OK=""
FORWARD_PID=""

say() { echo "kind.sh: $*" >&2; }

diagnose() {
    [ -n "$CLUSTER_OK" ] || return 0
    say "what the cluster shows:"
    kubectl get models,modelinfers,deployments,httproutes,pods -n "$NAMESPACE" -o wide >&2 || true
    kubectl get "model/$MODEL" -n "$NAMESPACE" -o jsonpath='{range .status.conditions[*]}{.type}={.status} {.reason}: {.message}{"\n"}{end}' >&2 || true
    kubectl get events -n "$NAMESPACE" --sort-by=.lastTimestamp 2>/dev/null | tail -n 20 >&2 || true
    kubectl get pods -n "$SYSTEM_NS" -o wide >&2 || true
    kubectl logs -n "$SYSTEM_NS" -l app.kubernetes.io/name=infergate-controllers \
        --tail=50 --prefix >&2 || true
}

fail() {
    say "FAILED: $*"
    diagnose
    exit 1
}

cleanup() {
    local status=$?
    if [ -n "$FORWARD_PID" ]; then kill "$FORWARD_PID" 2>/dev/null || true; fi
    if [ -z "$KEEP" ] && [ -n "$CLUSTER_OK" ]; then
        kubectl delete namespace "$NAMESPACE" --ignore-not-found --wait=false >/dev/null 2>&1 || true
        # first the webhook: with failurePolicy Fail and no controllers, our kinds would be
        # refused cluster-wide. Our CRDs stay (deleting them deletes every such object).
        kubectl delete -f "$ROOT/gateway-manifests/webhook.yaml" --ignore-not-found \
            >/dev/null 2>&1 || true
        kubectl delete -f "$ROOT/gateway-manifests/controllers.yaml" --ignore-not-found \
            --wait=false >/dev/null 2>&1 || true
    fi
    rm -rf "$WORK"
    exit "$status"
}
trap cleanup EXIT

# wait_for WHAT COMMAND...: until COMMAND succeeds, or fail after $TIMEOUT seconds.
wait_for() {
    local what=$1 deadline=$((SECONDS + TIMEOUT))
    shift
    say "waiting for $what"
    until "$@" >/dev/null 2>&1; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            fail "timed out after ${TIMEOUT}s waiting for $what"
        fi
        sleep 2
    done
}

# jsonpath_is KIND/NAME NAMESPACE PATH VALUE
jsonpath_is() {
    [ "$(kubectl get "$1" -n "$2" -o "jsonpath={$3}" 2>/dev/null)" = "$4" ]
}

# pods_are SELECTOR COUNT: exactly COUNT pods match (terminating ones count until gone)
pods_are() {
    [ "$(kubectl get pods -n "$NAMESPACE" -l "$1" -o name 2>/dev/null | wc -l)" -eq "$2" ]
}

# gone KIND/NAME: the object no longer exists in $NAMESPACE
gone() {
    ! kubectl get "$1" -n "$NAMESPACE" >/dev/null 2>&1
}

# serves GROUP/VERSION: the cluster serves that API
serves() {
    grep -qx "$1" "$WORK/api-versions"
}

# reachable_is FIELD VALUE: the Model's Reachable condition's status or reason is VALUE
reachable_is() {
    jsonpath_is "model/$MODEL" "$NAMESPACE" ".status.conditions[?(@.type==\"Reachable\")].$1" "$2"
}

# ---- 0. the cluster and its Gateway controller --------------------------------------------
[ -n "${KUBECONFIG:-}" ] || fail "KUBECONFIG is not set: point it at the cluster to use"
command -v kubectl >/dev/null || fail "kubectl is not on PATH"
kubectl version >/dev/null 2>&1 || fail "the cluster in $KUBECONFIG does not answer (kubectl version)"
CLUSTER_OK=1
cd "$ROOT"
kubectl api-versions >"$WORK/api-versions" || fail "kubectl api-versions"
# NOT_REACHABLE: the Reachable reason to stop at when the cluster cannot serve the route;
# empty: the Model must become Reachable and answer through the Gateway.
NOT_REACHABLE=""
if serves gateway.envoyproxy.io/v1alpha1 && serves aigateway.envoyproxy.io/v1alpha1; then
    say "Envoy Gateway and Envoy AI Gateway are installed: the Model must become Reachable" \
        "and answer through the Gateway"
elif serves gateway.envoyproxy.io/v1alpha1; then
    NOT_REACHABLE=RouteRefsUnresolved
    say "Envoy Gateway without Envoy AI Gateway (no aigateway.envoyproxy.io API): an" \
        "InferencePool backendRef stays unresolved; checking everything up to" \
        "Reachable=$NOT_REACHABLE (README, \"A Model in a cluster\", the recipe)"
else
    NOT_REACHABLE=RouteNotSeen
    say "no Gateway controller (no gateway.envoyproxy.io API; gateway-manifests/README.md," \
        "Order 0): checking everything up to Reachable=$NOT_REACHABLE"
    if ! serves gateway.networking.k8s.io/v1; then
        say "no Gateway API CRDs either: applying $GATEWAY_API_CRDS"
        kubectl apply --server-side -f "$GATEWAY_API_CRDS" >/dev/null \
            || fail "kubectl apply of the Gateway API CRDs ($GATEWAY_API_CRDS)"
        kubectl wait --for=condition=Established --timeout="${TIMEOUT}s" \
            crd/httproutes.gateway.networking.k8s.io >/dev/null \
            || fail "the HTTPRoute CRD was not established"
    fi
fi

# ---- 1. the upstream CRDs, only where the cluster has none ----------------------------------
say "creating the upstream CRDs where the cluster has none (infergate install --upstream-crds)"
infergate install --upstream-crds >"$WORK/upstream-crds.yaml" || fail "infergate install --upstream-crds"
kubectl get -f "$WORK/upstream-crds.yaml" >/dev/null 2>&1 \
    || kubectl create -f "$WORK/upstream-crds.yaml" >/dev/null 2>&1 \
    || fail "kubectl create of the upstream CRDs"

# ---- 2. the namespace and the certificates the install does not make -------------------------
for ns in "$NAMESPACE" "$SYSTEM_NS"; do
    kubectl create namespace "$ns" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
done
"$PYTHON" - "$WORK/certs" "$GATEWAY_HOST" <<'PY' || fail "making the certificates"
import sys
from pathlib import Path
from infergw.cluster.certs import serving_cert
from infergw.controllers.webhook import webhook_cert
webhook_cert().write(Path(sys.argv[1], "webhook"))
serving_cert(hosts=(sys.argv[2],)).write(Path(sys.argv[1], "gateway"))
PY
kubectl create secret tls infergate-controllers-webhook-tls -n "$SYSTEM_NS" \
    --cert="$WORK/certs/webhook/tls.crt" --key="$WORK/certs/webhook/tls.key" \
    --dry-run=client -o yaml | kubectl apply -f - >/dev/null || fail "creating the webhook's Secret"
kubectl create secret tls "$GATEWAY-tls" -n "$NAMESPACE" \
    --cert="$WORK/certs/gateway/tls.crt" --key="$WORK/certs/gateway/tls.key" \
    --dry-run=client -o yaml | kubectl apply -f - >/dev/null || fail "creating the Gateway's Secret"

# ---- 3. the install ---------------------------------------------------------------------------
say "infergate install --namespace $NAMESPACE | kubectl apply --server-side -f - (image $IMAGE)"
install_stream >"$WORK/install.yaml" || fail "infergate install"
"$PYTHON" "$ROOT/tests/e2e/served_only.py" "$WORK/api-versions" <"$WORK/install.yaml" \
    >"$WORK/served.yaml" || fail "reading the install stream"
kubectl apply --server-side --force-conflicts -f "$WORK/served.yaml" >/dev/null \
    || fail "kubectl apply of the install"
kubectl rollout status deployment/infergate-controllers -n "$SYSTEM_NS" \
    --timeout="${TIMEOUT}s" || fail "the controllers' Deployment did not become ready"
kubectl patch validatingwebhookconfiguration infergate-validation --type=json -p \
    "[{\"op\":\"add\",\"path\":\"/webhooks/0/clientConfig/caBundle\",\"value\":\"$(base64 <"$WORK/certs/webhook/ca.crt" | tr -d '\n')\"}]" \
    >/dev/null || fail "setting the webhook's caBundle"

# ---- 4. a Model ---------------------------------------------------------------------------------
say "kubectl apply -f model.yaml: Model $NAMESPACE/$MODEL (image $IMAGE)"
manifests | kubectl apply -f - >/dev/null || fail "kubectl apply of the Model"
wait_for "ModelInfer $MODEL to report 1 ready serving group" \
    jsonpath_is "modelinfer/$MODEL" "$NAMESPACE" .status.readyReplicas 1
wait_for "Model $MODEL to be Ready" \
    jsonpath_is "model/$MODEL" "$NAMESPACE" '.status.conditions[?(@.type=="Ready")].status' True
for kind in modelserver modelroute inferencepool autoscalingpolicybinding httproute; do
    kubectl get "$kind/$MODEL" -n "$NAMESPACE" >/dev/null 2>&1 \
        || fail "the Model made no $kind $MODEL"
done
PICKER=$(kubectl get "inferencepool/$MODEL" -n "$NAMESPACE" \
    -o 'jsonpath={.spec.endpointPickerRef.name}') || fail "reading the pool's endpointPickerRef"
wait_for "the picker Deployment $PICKER to be Available" jsonpath_is "deployment/$PICKER" \
    "$NAMESPACE" '.status.conditions[?(@.type=="Available")].status' True

# ---- 5. Reachable, and a chat completion through the Gateway -------------------------------------
if [ -n "$NOT_REACHABLE" ]; then
    wait_for "Model $MODEL to say Reachable=False $NOT_REACHABLE" \
        reachable_is reason "$NOT_REACHABLE"
    say "stopped at Reachable=False $NOT_REACHABLE: no request sent"
else
    wait_for "Model $MODEL to be Reachable (route Accepted with ResolvedRefs, EnvoyPatchPolicies Accepted and Programmed, picker Available)" \
        reachable_is status True
    ENVOY=$(kubectl get service -n envoy-gateway-system -o name \
        -l "gateway.envoyproxy.io/owning-gateway-name=$GATEWAY,gateway.envoyproxy.io/owning-gateway-namespace=$NAMESPACE" \
        | head -n 1)
    [ -n "$ENVOY" ] || fail "no Envoy Service of Gateway $NAMESPACE/$GATEWAY in envoy-gateway-system"
    PORT=$((20000 + RANDOM % 20000))
    kubectl port-forward -n envoy-gateway-system "$ENVOY" "$PORT:443" >"$WORK/forward.log" 2>&1 &
    FORWARD_PID=$!
    say "POST /v1/chat/completions through $ENVOY (kubectl port-forward on 127.0.0.1:$PORT)"
    chat() {
        curl -sS --fail --max-time 30 --cacert "$WORK/certs/gateway/ca.crt" \
            --resolve "$GATEWAY_HOST:$PORT:127.0.0.1" -H 'content-type: application/json' \
            -d "{\"model\": \"$MODEL\", \"messages\": [{\"role\": \"user\", \"content\": \"Hello\"}], \"max_tokens\": 8}" \
            -o "$WORK/chat.json" "https://$GATEWAY_HOST:$PORT/v1/chat/completions"
    }
    wait_for "a chat completion through the Gateway" chat
    grep -q '"choices"' "$WORK/chat.json" || fail "the answer has no choices: $(cat "$WORK/chat.json")"
    kill "$FORWARD_PID" 2>/dev/null || true
    FORWARD_PID=""
fi

# ---- 6. scale ---------------------------------------------------------------------------------
say "kubectl scale modelinfer $MODEL --replicas=2"
kubectl scale "modelinfer/$MODEL" -n "$NAMESPACE" --replicas=2 >/dev/null \
    || fail "kubectl scale modelinfer (the CRD's scale subresource)"
wait_for "ModelInfer $MODEL to report 2 ready serving groups" \
    jsonpath_is "modelinfer/$MODEL" "$NAMESPACE" .status.readyReplicas 2
pods_are "infergate.io/modelinfer=$MODEL" 2 || fail "2 groups but not 2 pods"
jsonpath_is "modelinfer/$MODEL" "$NAMESPACE" .spec.replicas 2 \
    || fail "the scale did not hold: something set spec.replicas back"
wait_for "Model $MODEL to count 2 ready groups" \
    jsonpath_is "model/$MODEL" "$NAMESPACE" .status.readyReplicas 2

# ---- 7. delete ----------------------------------------------------------------------------------
say "deleting Model $MODEL"
kubectl delete "model/$MODEL" -n "$NAMESPACE" --wait=true --timeout="${TIMEOUT}s" >/dev/null \
    || fail "kubectl delete of the Model"
wait_for "the Model's pods to go" pods_are "infergate.io/model=$MODEL" 0
wait_for "ModelInfer $MODEL to go (garbage-collected)" gone "modelinfer/$MODEL"
wait_for "the picker Deployment $PICKER to go (garbage-collected)" gone "deployment/$PICKER"
wait_for "HTTPRoute $MODEL to go (garbage-collected)" gone "httproute/$MODEL"

say "PASSED: install → Model → picker Available → ${NOT_REACHABLE:-Reachable → chat} → scale to 2 → deleted, all it made gone"
