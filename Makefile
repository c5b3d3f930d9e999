# cifarlab's commands: `make help` lists them. Every target creates the virtual environment first if it is missing
# (or older than pyproject.toml or the lock).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=

##@ Environment and tests
.PHONY: venv help test pytest test-fast test-scaleout test-shuffled lint format typecheck precommit system-deps clean

# Exactly the hash-pinned requirements/train.txt (uv pip sync), torch's CPU build, then this repository; refuses a lock
# older than pyproject.toml's dependencies; a set-up cut short is finished by the next run (scripts/setup_venv.py).
SETUP_VENV = $(PYTHON) scripts/setup_venv.py --venv $(VENV) --torch-index $(TORCH_INDEX) \
	$(if $(TORCH_FIND_LINKS),--torch-find-links $(TORCH_FIND_LINKS))
$(STAMP): pyproject.toml requirements/train.txt
	@$(SETUP_VENV)

venv: $(STAMP)  ## the virtual environment .venv, with the train, serve, dev and pipeline extras

help:  ## this list: every target, by section, with what it does
	@awk 'BEGIN {FS = ":.*## "} /^##@ / {printf "\n%s\n", substr($$0, 5)} \
		/^[a-zA-Z0-9_-]+:.*## / {gsub(/\$$\$$/, "$$", $$2); printf "  %-20s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

test: system-deps lint typecheck pytest  ## system packages if missing, lint, type check, then the test suite (.ci/run)

pytest: venv peer-venvs  ## the test suite alone (the serving benchmark's peers' venvs first): make pytest ARGS="tests/delivery -x"
	$(BIN)/python -m pytest -n auto $(ARGS)

test-fast: venv  ## the unit tier: no real server (MLflow, GCS, Prometheus, Docker), no DDP, no trained model
	$(BIN)/python -m pytest -n auto -m "not integration and not slow" $(ARGS)

# The loopback SLURM cluster runs its daemons as root (slurmd starts jobs as their users): through sudo otherwise, as
# on CI's hosted runners, whose user has password-less sudo.
AS_ROOT = $(if $(filter 0,$(shell id -u)),,sudo --preserve-env env "PATH=$$PATH")
test-scaleout: venv  ## the SLURM scale-out tests alone, as root (through sudo when not root)
	$(AS_ROOT) $(BIN)/python -m pytest -n auto tests/scaleout $(ARGS)

# Serial by default, so that a seed reproduces the order exactly (ARGS="-n auto" spreads it over the cores).
# The RNGs are not reseeded before each test: a test sees the random state a normal run gives it, in a new order.
SEED ?=
test-shuffled: venv  ## the suite in a random order, printed as its seed: make test-shuffled SEED=1234 ARGS="tests/serve"
	$(BIN)/python -m pytest -n 0 -p randomly $(if $(SEED),--randomly-seed=$(SEED)) --randomly-dont-reset-seed $(ARGS)

lint: venv  ## ruff: lint and formatting check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv  ## ruff: fix what it can, then format
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# mypy: the training package, the contract, the lifecycle and the service (settings in pyproject.toml)
TYPECHECK_PATHS := src/cifarlab src/cifarlab_contract src/cifarlab_lifecycle src/hydra_plugins serve

typecheck: venv  ## mypy on the packages (configured in pyproject.toml)
	$(BIN)/mypy $(TYPECHECK_PATHS)

precommit: venv  ## every pre-commit hook on every file
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/pre-commit run --all-files --show-diff-on-failure

system-deps:  ## the system packages the tests need (requirements/system-packages), installed when missing
	@scripts/system_deps.sh

clean:  ## remove runs/, logs/ and the pytest cache
	rm -rf runs logs .pytest_cache

##@ Training and tracking
.PHONY: train mps-train smoke mlflow-ui mlflow-server compare quantize bench-scaleout bench-export

train: venv  ## train on the committed sample (or $$CIFAR10_SOURCE); extra Hydra overrides: make train ARGS="model=resnet18"
	$(BIN)/python train.py $(ARGS)

# CI's macOS job: Lightning's "GPU available" line must say MPS was used exactly where torch has it.
MPS_LOG := build/mps-train.log
mps-train: venv  ## a few training steps with accelerator=auto, as `make train` runs on a Mac; checks the device used
	mkdir -p build
	$(BIN)/python train.py trainer.accelerator=auto debug=limit logger=csv >$(MPS_LOG) 2>&1 || { cat $(MPS_LOG); exit 1; }
	if $(BIN)/python -c "import sys, torch; sys.exit(not torch.backends.mps.is_available())"; then \
		expected="GPU available: True (mps), used: True"; else expected="GPU available: False, used: False"; fi; \
	grep -F "$$expected" $(MPS_LOG) || { echo "error: $(MPS_LOG) lacks \"$$expected\"" >&2; exit 1; }

smoke: venv  ## train a tiny model on the committed sample, export it, serve it, predict one image over HTTP
	PATH="$(abspath $(BIN)):$$PATH" scripts/smoke.sh

mlflow-ui: venv  ## browse the local tracking store at http://127.0.0.1:5000
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db --host 127.0.0.1 --port 5000

mlflow-server: venv  ## tracking server + model registry on the same store: export MLFLOW_TRACKING_URI=http://127.0.0.1:5000
	mkdir -p mlruns
	$(BIN)/mlflow server --backend-store-uri sqlite:///mlruns/mlflow.db --artifacts-destination $(CURDIR)/mlruns/artifacts \
		--host 127.0.0.1 --port 5000

compare: venv  ## the MLflow comparison as a terminal table: make compare ARGS="--sweep <id>"
	$(BIN)/python scripts/compare_runs.py $(ARGS)

quantize: venv  ## static INT8 copy of an export, kept if it holds its test accuracy: make quantize ARGS="--model runs/<id>/model.onnx"
	$(BIN)/python scripts/quantize.py $(ARGS)

bench-scaleout: venv system-deps  ## (root) the README's sweep through a loopback SLURM cluster vs hydra/launcher=basic; JSON + Markdown
	$(BIN)/python -m benchmarks.scaleout.bench_sweep $(ARGS)

bench-export: venv  ## the ONNX export at fit end with and without its preload, fresh processes taking turns; JSON
	$(BIN)/python -m benchmarks.training.bench_export $(ARGS)

##@ Model lifecycle: registry, A/B, retraining
.PHONY: promote ab-report retrain

promote: venv  ## challenger vs champion on the test set; moves champion if better: make promote ARGS="margin=0.005"
	$(BIN)/python scripts/promote.py $(ARGS)

ab-report: venv  ## challenger vs champion on the served feedback: make ab-report ARGS="--feedback $$FEEDBACK_DIR"
	$(BIN)/python scripts/ab_report.py $(ARGS)

retrain: venv  ## merge $$FEEDBACK_DIR (a folder or gs://...) into data/feedback, dvc repro, register a challenger if not worse: make retrain ARGS="tolerance=0.005"
	$(BIN)/python scripts/retrain.py $(ARGS)

##@ Serving
.PHONY: serve bench-serve bench-shed bench-overhead peer-venvs

# The newest exported model unless MODEL_URI is set (a path, or models:/<name>@<alias> with MLflow installed).
MODEL_URI ?= $(shell ls -t runs/*/model.onnx 2>/dev/null | head -n 1)
SERVE_IMAGE ?= cifarlab-serve
NO_MODEL := echo "error: no runs/*/model.onnx: train one first (make train) or set MODEL_URI (or VARIANTS)" >&2; exit 1

serve: venv  ## the API on http://127.0.0.1:8000 (docs at /docs); uvicorn options: make serve ARGS="--port 9000"
	$(if $(strip $(MODEL_URI)$(VARIANTS)),,@$(NO_MODEL))
	MODEL_URI="$(MODEL_URI)" $(BIN)/uvicorn serve.app:create_app --factory --host 127.0.0.1 --port 8000 --no-access-log $(ARGS)

bench-serve: venv peer-venvs  ## serving benchmark: serve/ vs BentoML, Triton (PyTriton), a bare floor, a PyTorch baseline
	$(BIN)/python -m benchmarks.serving.bench_serve $(ARGS)

bench-shed: venv  ## load shedding at twice the measured capacity: accepted p99, throughput, RSS; JSON + Markdown
	$(BIN)/python -m benchmarks.serving.bench_shed $(ARGS)

# Each peer of the serving benchmark in its own virtual environment (BentoML 1.4 needs numpy 2, PyTriton 0.7
# numpy < 2), exactly its hash-pinned lock (requirements/peer-*.txt, made by make lock-peers from peer-*.in).
PEERS := bentoml pytriton
peer-venvs: $(foreach peer,$(PEERS),build/peer-venvs/$(peer)/.installed)  ## the benchmark's peers' virtual environments

build/peer-venvs/%/.installed: requirements/peer-%.txt | venv
	rm -rf build/peer-venvs/$*
	$(BIN)/uv venv --quiet --python $(PYTHON) build/peer-venvs/$*
	$(BIN)/uv pip sync --quiet --require-hashes --python build/peer-venvs/$*/bin/python requirements/peer-$*.txt
	touch $@

bench-overhead: venv  ## CPU time per request besides the model, each server, in-process; writes JSON + Markdown
	$(BIN)/python -m benchmarks.serving.overhead $(ARGS)

##@ Monitoring
.PHONY: drift-eval dashboards prometheus

drift-eval: venv  ## drift flag rates on clean and corrupted test images: make drift-eval ARGS="--quick"
	$(BIN)/python scripts/drift_eval.py $(ARGS)

dashboards: venv  ## regenerate monitoring/grafana/dashboards/*.json from build_dashboards.py
	$(BIN)/python monitoring/grafana/build_dashboards.py

SERVE_ADDR ?= 127.0.0.1:8000
prometheus: system-deps  ## Prometheus at http://127.0.0.1:9090 with the project's rules, scraping $(SERVE_ADDR) (no Docker)
	sed 's/serve:8000/$(SERVE_ADDR)/' monitoring/prometheus/prometheus.yml > monitoring/prometheus/local.yml
	prometheus --config.file=monitoring/prometheus/local.yml --storage.tsdb.path=.prometheus \
		--web.listen-address=127.0.0.1:9090

##@ Pipeline (DVC)
.PHONY: dvc-pull dvc-push dvc-lock

DVC_TARGETS ?=

dvc-pull: venv  ## fetch DVC-tracked data and models from the remote (all, or DVC_TARGETS="train")
	$(BIN)/dvc pull $(DVC_TARGETS)

dvc-push: venv  ## store new DVC-tracked outputs on the remote
	$(BIN)/dvc push $(DVC_TARGETS)

dvc-lock: venv  ## regenerate dvc.lock and reports/ by a real dvc repro on the committed sample (docs/pipeline-lock.md)
	PATH="$(abspath $(BIN)):$$PATH" scripts/dvc_lock.sh

##@ Delivery: lock files, the serving image, the release
.PHONY: lock lock-peers install-locked docker-engine docker-base docker-wheels docker-build docker-build-baked docker-smoke release-model docker-publish

# The locks are for CI's and the image's platform, wherever they are made. torch's CPU build comes from PyTorch's
# CPU index ([tool.uv.sources]), or offline from a folder of wheels: TORCH_FIND_LINKS (pip's find-links if set).
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_FIND_LINKS ?= $(PIP_FIND_LINKS)
LOCK = $(BIN)/uv pip compile pyproject.toml --generate-hashes --python-version 3.11 --quiet \
	--python-platform x86_64-manylinux_2_28 --custom-compile-command "make lock" \
	$(if $(TORCH_FIND_LINKS),--no-sources --find-links $(TORCH_FIND_LINKS))

lock:  ## regenerate the hash-pinned lock files from pyproject.toml (torch stays out: docs/delivery.md)
	@$(SETUP_VENV) --uv-only
	$(LOCK) --extra serve --output-file requirements/serve.txt
	$(LOCK) --all-extras --no-emit-package torch --output-file requirements/train.txt
	$(PYTHON) scripts/setup_venv.py --record-digest requirements/serve.txt requirements/train.txt

# PyTriton's wheels are manylinux_2_35 only (this lock is for glibc 2.35 and newer, as its bundled Triton needs)
PEER_PLATFORM_bentoml := x86_64-manylinux_2_28
PEER_PLATFORM_pytriton := x86_64-manylinux_2_35
lock-peers:  ## regenerate the peers' hash-pinned locks requirements/peer-*.txt from requirements/peer-*.in
	@$(SETUP_VENV) --uv-only
	$(foreach peer,$(PEERS),$(BIN)/uv pip compile requirements/peer-$(peer).in --generate-hashes --python-version 3.11 \
		--quiet --python-platform $(PEER_PLATFORM_$(peer)) --custom-compile-command "make lock-peers" \
		--output-file requirements/peer-$(peer).txt &&) true

install-locked:  ## (CI's name for make venv, which installs from the lock alone) rebuild .venv from the lock now
	@$(SETUP_VENV)

# The serving image (docs/delivery.md); the engine and the base image come from scripts/docker_engine.sh.
BASE_IMAGE ?= debian:bookworm-slim
BAKED_IMAGE ?= $(SERVE_IMAGE):baked
DOCKER_ENGINE := scripts/docker_engine.sh
# An engine without a bridge network (dockerd --bridge=none, as docker-engine starts it) gives builds and containers
# no network of their own: they use the host's, the service listening on loopback only.
NO_BRIDGE = $(shell docker network inspect bridge >/dev/null 2>&1 || echo 1)
BUILD_NETWORK = $(if $(NO_BRIDGE),--network host)
SMOKE_PORT ?= 8000
RUN_NETWORK = $(if $(NO_BRIDGE),--network host -e UVICORN_HOST=127.0.0.1,-p 127.0.0.1:$(SMOKE_PORT):$(SMOKE_PORT))
# The locked wheels for the engine's Linux, whatever the host's OS; pip's index and certificates are the host's.
WHEEL_PLATFORMS = $(foreach tag,manylinux_2_28 manylinux_2_17 manylinux2014,--platform $(tag)_$(ENGINE_ARCH))
ENGINE_ARCH = $(shell docker info --format '{{.Architecture}}' 2>/dev/null)
TINY_TRAIN := trainer.accelerator=cpu debug=limit logger=none seed=0

docker-engine:  ## start dockerd (root) unless an engine answers; one line and exit 1 when it cannot
	@$(DOCKER_ENGINE) engine

docker-base: docker-engine  ## $(BASE_IMAGE): present, pulled, or made with debootstrap from this machine's apt sources
	@$(DOCKER_ENGINE) base $(BASE_IMAGE)

docker-wheels: docker-engine  ## download requirements/serve.txt's wheels (hash-checked) into build/wheels for the build
	$(PYTHON) -m pip download --quiet --disable-pip-version-check --no-deps --require-hashes --only-binary=:all: \
		--python-version 3.11 --implementation cp $(WHEEL_PLATFORMS) -d build/wheels -r requirements/serve.txt

docker-build: docker-base docker-wheels  ## the serving image $(SERVE_IMAGE), from the locked wheels, offline
	docker build $(BUILD_NETWORK) --build-arg BASE_IMAGE=$(BASE_IMAGE) -t $(SERVE_IMAGE) .

docker-build-baked: docker-build  ## $(BAKED_IMAGE): the serving image with build/release-model/model.onnx inside
	@test -f build/release-model/model.onnx || { echo "error: build/release-model/model.onnx is missing; run make release-model" >&2; exit 1; }
	docker build --build-arg SERVE_IMAGE=$(SERVE_IMAGE) -f docker/release.Dockerfile -t $(BAKED_IMAGE) build/release-model

docker-smoke: docker-build  ## $(SERVE_IMAGE) as its own user on MODEL_URI (newest run, else a tiny one trained): /readyz, one prediction
	@model="$(MODEL_URI)"; \
	if [ -z "$$model" ]; then \
		echo "no runs/*/model.onnx: training a tiny model on the committed sample (make train ARGS=\"$(TINY_TRAIN)\")"; \
		$(MAKE) --no-print-directory train ARGS="$(TINY_TRAIN)" >/dev/null 2>&1 || { echo "error: training failed; run make train" >&2; exit 1; }; \
		model=$$(ls -t runs/*/model.onnx | head -n 1); \
	fi; \
	install -D -m 0644 "$$model" build/docker-smoke/model.onnx; \
	docker run -d --rm --name cifarlab-serve-smoke $(RUN_NETWORK) -e UVICORN_PORT=$(SMOKE_PORT) \
		-v "$(CURDIR)/build/docker-smoke/model.onnx:/models/model.onnx:ro" $(SERVE_IMAGE) >/dev/null || exit 1; \
	$(PYTHON) scripts/smoke_serve.py --url http://127.0.0.1:$(SMOKE_PORT) --timeout 60 \
		|| { docker logs cifarlab-serve-smoke; docker stop cifarlab-serve-smoke >/dev/null; exit 1; }; \
	docker stop cifarlab-serve-smoke >/dev/null

# where the train stage leaves its ONNX export (dvc.yaml); the release image is pushed as RELEASE_IMAGE
RELEASE_MODEL ?= models/model.onnx
RELEASE_IMAGE ?= cifarlab-serve
RELEASE_VERSION ?=

release-model:  ## stage the pulled model as the only file of the release image's build context
	rm -rf build/release-model && mkdir -p build/release-model
	cp $(RELEASE_MODEL) build/release-model/model.onnx

docker-publish: docker-base docker-wheels  ## push $(RELEASE_IMAGE):sha-<commit> (and :$(RELEASE_VERSION)); buildx adds provenance, SBOM
	BUILD_NETWORK="$(BUILD_NETWORK)" SERVE_IMAGE=$(SERVE_IMAGE) scripts/publish_image.sh $(RELEASE_IMAGE) $(RELEASE_VERSION)
