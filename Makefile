# Every target creates the virtual environment first if it is missing (or older than pyproject.toml).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: venv train test lint format mlflow-ui compare clean serve docker-build docker-smoke bench-serve

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and exactly pinned: it takes the local CPU wheel instead of the CUDA build
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[train,serve,dev]"
	touch $(STAMP)

venv: $(STAMP)

train: venv  ## train on the committed sample (or $$CIFAR10_SOURCE); extra Hydra overrides: make train ARGS="model=resnet18"
	$(BIN)/python train.py $(ARGS)

test: venv lint  ## lint, then the test suite
	$(BIN)/python -m pytest $(ARGS)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

mlflow-ui: venv  ## browse the local tracking store at http://127.0.0.1:5000
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db --host 127.0.0.1 --port 5000

compare: venv  ## the MLflow comparison as a terminal table: make compare ARGS="--sweep <id>"
	$(BIN)/python scripts/compare_runs.py $(ARGS)

# --- inference service (serve/) ---
# The newest exported model unless MODEL_URI is set (a path, or models:/<name>@<alias> with MLflow installed).
MODEL_URI ?= $(shell ls -t runs/*/model.onnx 2>/dev/null | head -n 1)
SERVE_IMAGE ?= cifarlab-serve
NO_MODEL := echo "error: no runs/*/model.onnx: train one first (make train) or set MODEL_URI" >&2; exit 1

serve: venv  ## the API on http://127.0.0.1:8000 (docs at /docs); uvicorn options: make serve ARGS="--port 9000"
	@test -n "$(MODEL_URI)" || { $(NO_MODEL); }
	MODEL_URI="$(MODEL_URI)" $(BIN)/uvicorn serve.app:create_app --factory --host 127.0.0.1 --port 8000 --no-access-log $(ARGS)

docker-build:  ## the serving image (needs a Docker engine)
	docker build -t $(SERVE_IMAGE) .

docker-smoke:  ## run the image on the newest model, check /readyz and one prediction, stop it
	@test -n "$(MODEL_URI)" || { $(NO_MODEL); }
	docker run -d --rm --name cifarlab-serve-smoke -p 127.0.0.1:8000:8000 --user "$$(id -u):$$(id -g)" \
		-v "$(abspath $(MODEL_URI)):/models/model.onnx:ro" $(SERVE_IMAGE)
	$(PYTHON) scripts/smoke_serve.py --url http://127.0.0.1:8000 --timeout 60 \
		|| { docker logs cifarlab-serve-smoke; docker stop cifarlab-serve-smoke; exit 1; }
	docker stop cifarlab-serve-smoke

bench-serve: venv  ## serving benchmark: ONNX Runtime server vs a PyTorch-eager baseline, writes JSON + Markdown
	$(BIN)/python -m benchmarks.serving.bench_serve $(ARGS)

clean:
	rm -rf runs logs .pytest_cache
