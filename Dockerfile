# The infergate image: every command of the project in one image, as `infergate <command>`.
# gateway-manifests/epp.yaml and controllers.yaml run it with their own `command`
# (`infergate epp`, `infergate controllers`).
#
# Without a command, arguments that start with a flag run the simulator on all addresses, as
# vLLM's image runs its server: a Model whose `image` is this one gets simulator pods (the
# controllers pass vLLM's engine args: --model, --served-model-name, --port, ...). The
# simulator's own small tokenizer is at /opt/infergate/models/infergate-sim, so such a Model
# says `modelURI: file:///opt/infergate/models/infergate-sim`.
#
#   docker build --build-arg INFERGATE_COMMIT=$(git rev-parse HEAD) \
#       -t ghcr.io/infergate/infergate:latest .        # or: make image
#   kind load docker-image ghcr.io/infergate/infergate:latest   # for a kind cluster
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The commit `infergate --version` and inference_extension_info name (setup.py writes it into
# the package: the build context has no .git). Without it they say "unknown".
ARG INFERGATE_COMMIT=""

WORKDIR /src
COPY pyproject.toml setup.py README.md LICENSE ./
COPY infergate ./infergate
COPY api ./api
COPY cluster ./cluster
COPY kvindex ./kvindex
COPY simulator ./simulator
COPY epp ./epp
COPY bbr ./bbr
COPY connector ./connector
COPY controllers ./controllers
COPY stack ./stack
COPY bench ./bench
COPY fetch ./fetch
COPY runtime ./runtime
# The files the commands read (package data: stack/resources.py).
COPY examples ./examples
COPY gateway-manifests ./gateway-manifests
COPY crds ./crds
# opentelemetry-proto again last: xds-protos' older copy of its files breaks the OTLP
# exporters when it lands on top (api/tracing.py).
RUN pip install '.[s3]' \
    && pip install --force-reinstall --no-deps opentelemetry-proto \
    && cd / && rm -rf /src \
    && mkdir -p /opt/infergate/models \
    && ln -s "$(python -c 'import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec("infergw.simulator").origin).parent / "default_model")')" \
        /opt/infergate/models/infergate-sim \
    && test -f /opt/infergate/models/infergate-sim/tokenizer.json \
    && groupadd --gid 65532 infergate \
    && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin infergate

WORKDIR /tmp
USER 65532:65532
EXPOSE 8000 9002 9003 9090 9091 9443
ENTRYPOINT ["/bin/sh", "-c", "case \"${1:-}\" in -*) exec infergate simulate --host=0.0.0.0 \"$@\" ;; *) exec infergate \"$@\" ;; esac", "infergate"]
