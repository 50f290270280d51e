#!/usr/bin/env bash
# The controllers against a real cluster (kind, or any you can spare): a simulator Model comes
# up, is scaled with `kubectl scale modelinfer`, and goes away with everything it made.
#
#   KUBECONFIG=~/.kube/config tests/e2e/kind.sh
#       CRDs applied; the controllers run here, from this checkout, in kubernetes mode with
#       leader election (they use your kubeconfig's credentials).
#   IMAGE=ghcr.io/infergate/infergate:dev KUBECONFIG=... tests/e2e/kind.sh
#       the controllers run in the cluster from gateway-manifests/controllers.yaml with that
#       image (RBAC, two replicas, webhook certificate made here, webhook.yaml registered with
#       its caBundle): the RBAC and the webhook are exercised too. For kind, build the
#       Dockerfile and `kind load docker-image $IMAGE` first.
#   tests/e2e/kind.sh --print-manifests
#       print the Model and policy it applies, and touch no cluster.
#
# Environment: SIM_IMAGE, the Model's image (default: $IMAGE, else
# ghcr.io/infergate/infergate:latest; the Model's engine type is Simulator, so the pods run
# `infergate simulate`, which the image must have on its PATH); NAMESPACE for the Model (default infergate-e2e); TIMEOUT, seconds per
# wait (default 300: image pulls); PYTHON (default .venv/bin/python); KEEP=1 leaves it all.
# Exits non-zero with a message saying what did not happen, after printing what it saw.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
IMAGE=${IMAGE:-}
SIM_IMAGE=${SIM_IMAGE:-${IMAGE:-ghcr.io/infergate/infergate:latest}}
NAMESPACE=${NAMESPACE:-infergate-e2e}
TIMEOUT=${TIMEOUT:-300}
KEEP=${KEEP:-}
SYSTEM_NS=infergate-system
MODEL=e2e-sim
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi

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
  image: $SIM_IMAGE
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

if [ "${1:-}" = "--print-manifests" ]; then
    manifests
    exit 0
fi

WORK=$(mktemp -d)
CONTROLLERS_PID=""
CLUSTER_OK=""

say() { echo "kind.sh: $*" >&2; }

diagnose() {
    [ -n "$CLUSTER_OK" ] || return 0
    say "what the cluster shows:"
    kubectl get models,modelinfers,autoscalingpolicybindings,pods -n "$NAMESPACE" -o wide >&2 || true
    kubectl get events -n "$NAMESPACE" --sort-by=.lastTimestamp 2>/dev/null | tail -n 20 >&2 || true
    if [ -n "$IMAGE" ]; then
        kubectl get pods -n "$SYSTEM_NS" -o wide >&2 || true
        kubectl logs -n "$SYSTEM_NS" -l app.kubernetes.io/name=infergate-controllers \
            --tail=50 --prefix >&2 || true
    elif [ -f "$WORK/controllers.log" ]; then
        say "the controllers' log (last 50 lines):"
        tail -n 50 "$WORK/controllers.log" >&2 || true
    fi
}

fail() {
    say "FAILED: $*"
    diagnose
    exit 1
}

cleanup() {
    local status=$?
    if [ -n "$CONTROLLERS_PID" ] && kill -0 "$CONTROLLERS_PID" 2>/dev/null; then
        kill -TERM "$CONTROLLERS_PID" 2>/dev/null || true
        wait "$CONTROLLERS_PID" 2>/dev/null || true
    fi
    if [ -z "$KEEP" ]; then
        kubectl delete namespace "$NAMESPACE" --ignore-not-found --wait=false >/dev/null 2>&1 || true
        if [ -n "$IMAGE" ]; then
            # first the webhook: with failurePolicy Fail and no controllers, our kinds would
            # be refused cluster-wide
            kubectl delete -f "$ROOT/gateway-manifests/webhook.yaml" --ignore-not-found \
                >/dev/null 2>&1 || true
            kubectl delete -f "$ROOT/gateway-manifests/controllers.yaml" --ignore-not-found \
                --wait=false >/dev/null 2>&1 || true
        fi
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
        if [ -n "$CONTROLLERS_PID" ] && ! kill -0 "$CONTROLLERS_PID" 2>/dev/null; then
            fail "the controllers exited while waiting for $what"
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

# lease_held_by PATTERN: the Lease's holder matches the shell pattern
lease_held_by() {
    local holder
    holder=$(kubectl get lease infergate-controllers -n "$SYSTEM_NS" \
        -o 'jsonpath={.spec.holderIdentity}' 2>/dev/null) || return 1
    # shellcheck disable=SC2053  # a pattern on purpose
    [ -n "$holder" ] && [[ $holder == $1 ]]
}

# gone KIND/NAME: the object no longer exists in $NAMESPACE
gone() {
    ! kubectl get "$1" -n "$NAMESPACE" >/dev/null 2>&1
}

# ---- preconditions ------------------------------------------------------------------------
[ -n "${KUBECONFIG:-}" ] || fail "KUBECONFIG is not set: point it at the cluster to use"
command -v kubectl >/dev/null || fail "kubectl is not on PATH"
kubectl version >/dev/null 2>&1 || fail "the cluster in $KUBECONFIG does not answer (kubectl version)"
CLUSTER_OK=1
cd "$ROOT"

# ---- CRDs ---------------------------------------------------------------------------------
say "applying the CRDs (crds/upstream/ where the cluster has none, crds/)"
# An upstream install of InferencePool or InferenceObjective is never replaced.
for f in crds/upstream/*.yaml; do
    kubectl get -f "$f" >/dev/null 2>&1 || kubectl create -f "$f" >/dev/null \
        || fail "kubectl create -f $f"
done
kubectl apply --server-side --force-conflicts -f crds/ >/dev/null \
    || fail "kubectl apply of the CRDs"
kubectl wait --for=condition=Established --timeout="${TIMEOUT}s" -f crds/upstream/ -f crds/ \
    >/dev/null || fail "the CRDs were not established"

# ---- the controllers ----------------------------------------------------------------------
if [ -n "$IMAGE" ]; then
    say "running the controllers in the cluster with $IMAGE (gateway-manifests/controllers.yaml)"
    kubectl create namespace "$SYSTEM_NS" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
    "$PYTHON" -c "import sys, pathlib; from infergw.controllers.webhook import webhook_cert; \
webhook_cert().write(pathlib.Path(sys.argv[1]))" "$WORK/certs" \
        || fail "making the webhook certificate with controllers/webhook.py"
    kubectl create secret tls infergate-controllers-webhook-tls -n "$SYSTEM_NS" \
        --cert="$WORK/certs/tls.crt" --key="$WORK/certs/tls.key" --dry-run=client -o yaml \
        | kubectl apply -f - >/dev/null || fail "creating the webhook's Secret"
    sed -e "s|image: ghcr.io/infergate/infergate:latest|image: $IMAGE|" \
        -e "s|imagePullPolicy: Always|imagePullPolicy: IfNotPresent|" \
        gateway-manifests/controllers.yaml | kubectl apply -f - >/dev/null \
        || fail "kubectl apply of gateway-manifests/controllers.yaml"
    kubectl rollout status deployment/infergate-controllers -n "$SYSTEM_NS" \
        --timeout="${TIMEOUT}s" || fail "the controllers' Deployment did not become ready"
    kubectl apply -f gateway-manifests/webhook.yaml >/dev/null || fail "applying webhook.yaml"
    kubectl patch validatingwebhookconfiguration infergate-validation --type=json -p \
        "[{\"op\":\"add\",\"path\":\"/webhooks/0/clientConfig/caBundle\",\"value\":\"$(base64 <"$WORK/certs/ca.crt" | tr -d '\n')\"}]" \
        >/dev/null || fail "setting the webhook's caBundle"
else
    say "running the controllers here ($PYTHON -m infergw.controllers --mode kubernetes --leader-elect)"
    kubectl create namespace "$SYSTEM_NS" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
    "$PYTHON" -m infergw.controllers --mode kubernetes --leader-elect --leader-namespace "$SYSTEM_NS" \
        --metrics-port 0 >"$WORK/controllers.log" 2>&1 &
    CONTROLLERS_PID=$!
fi
if [ -n "$IMAGE" ]; then
    LEADER="infergate-controllers-*"  # a pod of the Deployment: <pod name>-<pid>
else
    LEADER="$(hostname)-$CONTROLLERS_PID"  # what controllers/app.py competes as
fi
wait_for "the controllers to hold the Lease $SYSTEM_NS/infergate-controllers ($LEADER)" \
    lease_held_by "$LEADER"

# ---- a Model ------------------------------------------------------------------------------
kubectl create namespace "$NAMESPACE" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
say "applying Model $NAMESPACE/$MODEL (image $SIM_IMAGE)"
manifests | kubectl apply -f - >/dev/null || fail "kubectl apply of the Model"

wait_for "ModelInfer $MODEL to report 1 ready serving group" \
    jsonpath_is "modelinfer/$MODEL" "$NAMESPACE" .status.readyReplicas 1
wait_for "Model $MODEL to be Ready" \
    jsonpath_is "model/$MODEL" "$NAMESPACE" '.status.conditions[?(@.type=="Ready")].status' True
for kind in modelserver modelroute inferencepool autoscalingpolicybinding; do
    kubectl get "$kind/$MODEL" -n "$NAMESPACE" >/dev/null 2>&1 \
        || fail "the Model made no $kind $MODEL"
done

# ---- scale ---------------------------------------------------------------------------------
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

# ---- delete --------------------------------------------------------------------------------
say "deleting Model $MODEL"
kubectl delete "model/$MODEL" -n "$NAMESPACE" --wait=true --timeout="${TIMEOUT}s" >/dev/null \
    || fail "kubectl delete of the Model"
wait_for "the Model's pods to go" pods_are "infergate.io/model=$MODEL" 0
wait_for "ModelInfer $MODEL to go (garbage-collected)" gone "modelinfer/$MODEL"

say "PASSED: Model → ModelInfer → 1 ready group → kubectl scale → 2 → deleted, pods gone"
