# Every target creates the virtual environment first if it is missing (or older than pyproject.toml).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: venv train test lint format mlflow-ui compare clean

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

clean:
	rm -rf runs logs .pytest_cache

# ---------------------------------------------------------------------------------------------- monitoring
.PHONY: system-deps drift-eval dashboards prometheus

# system tools the tests need: promtool (Debian/Ubuntu package prometheus; run as root)
system-deps:
	command -v promtool >/dev/null || (apt-get update -qq && apt-get install -y -qq prometheus)

drift-eval: venv  ## drift flag rates on clean and corrupted test images: make drift-eval ARGS="--quick"
	$(BIN)/python scripts/drift_eval.py $(ARGS)

dashboards: venv  ## regenerate monitoring/grafana/dashboards/*.json from build_dashboards.py
	$(BIN)/python monitoring/grafana/build_dashboards.py

SERVE_ADDR ?= 127.0.0.1:8000
prometheus: system-deps  ## Prometheus at http://127.0.0.1:9090 with the project's rules, scraping $(SERVE_ADDR) (no Docker)
	sed 's/serve:8000/$(SERVE_ADDR)/' monitoring/prometheus/prometheus.yml > monitoring/prometheus/local.yml
	prometheus --config.file=monitoring/prometheus/local.yml --storage.tsdb.path=.prometheus \
		--web.listen-address=127.0.0.1:9090
