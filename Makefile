# Every target creates the virtual environment first if it is missing (or older than pyproject.toml).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: venv train test lint format mlflow-ui compare clean mlflow-server promote

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and exactly pinned: it takes the local CPU wheel instead of the CUDA build
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[train,serve,dev,pipeline]"
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

mlflow-server: venv  ## tracking server + model registry on the same store: export MLFLOW_TRACKING_URI=http://127.0.0.1:5000
	mkdir -p mlruns
	$(BIN)/mlflow server --backend-store-uri sqlite:///mlruns/mlflow.db --artifacts-destination $(CURDIR)/mlruns/artifacts \
		--host 127.0.0.1 --port 5000

promote: venv  ## challenger vs champion on the test set; moves champion if better: make promote ARGS="margin=0.005"
	$(BIN)/python scripts/promote.py $(ARGS)

compare: venv  ## the MLflow comparison as a terminal table: make compare ARGS="--sweep <id>"
	$(BIN)/python scripts/compare_runs.py $(ARGS)

clean:
	rm -rf runs logs .pytest_cache
