"""Shared fixtures: the repository's paths, composed configs, and tiny training runs on the committed sample."""

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
SAMPLE = ROOT / "data" / "cifar10-sample.tar.gz"
# The real servers of the integration tier, each defined beside its helpers: a Docker engine and the serving image;
# an MLflow tracking server, a GCS emulator and a pipeline copy of the repository.
pytest_plugins = ["tests.containers", "tests.servers"]
# The markers a test must carry when it uses one of these fixtures, directly or through another fixture:
# `integration` for a real server, `slow` for a model trained for it. `make test-fast` runs neither.
MARKED_FIXTURES = {
    "integration": frozenset(
        {
            "docker_engine",
            "serve_image",
            "mlflow_server",
            "gcs",
            "pipeline_repo",
            "trained_version",
            "prometheus",
            "slurm_cluster",
        }
    ),
    "slow": frozenset({"tiny_run"}),
}
# the registry's aliases, as configs/registry.yaml names them for training, promotion and retraining
_REGISTRY = OmegaConf.load(CONFIGS / "registry.yaml").registry
CHAMPION_ALIAS, CHALLENGER_ALIAS = _REGISTRY.champion_alias, _REGISTRY.challenger_alias

# Small, fast and CPU-only: the overrides every training test starts from. One ONNX export per run, at the end, as
# configured (export takes seconds); tests/training/export/test_onnx.py checks the export of every new best.
TINY = [
    "trainer.accelerator=cpu",
    "debug=limit",
    "model.net.widths=[16,32,32]",
    f"data.source={SAMPLE}",
]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The unit tier (`-m "not integration and not slow"`) starts no real server and trains nothing: refuse a test
    that uses such a fixture without its marker."""
    unmarked = [
        f"{item.nodeid} ({marker})"
        for item in items
        for marker, fixtures in MARKED_FIXTURES.items()
        if fixtures & set(getattr(item, "fixturenames", ())) and item.get_closest_marker(marker) is None
    ]
    if unmarked:
        raise pytest.UsageError(f"tests that need a marker they lack: {unmarked}")


@pytest.fixture(autouse=True)
def project_root(monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PROJECT_ROOT", str(ROOT))
    monkeypatch.delenv("CIFAR10_SOURCE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return ROOT


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny network exported under the model contract, once per session (export is slow)."""
    # imported here: torch loads for the tests that use a model, not for every collection
    from cifarlab.export.onnx import export_onnx
    from cifarlab_contract.classes import CIFAR10_CLASSES
    from cifarlab_contract.model import contract_metadata
    from tests.training.export.test_onnx import tiny_net

    metadata = contract_metadata(CIFAR10_CLASSES, "run-7", "cd" * 32)
    return export_onnx(tiny_net(), tmp_path_factory.mktemp("tiny-model") / "model.onnx", metadata)


@pytest.fixture(scope="session")
def prepared_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One prepared copy of the sample for the whole session (preparing is what data tests test)."""
    return tmp_path_factory.mktemp("prepared")


@pytest.fixture
def compose_train(tmp_path: Path, prepared_root: Path) -> Callable[..., DictConfig]:
    """Compose configs/train.yaml as Hydra would for `python train.py <overrides>`, writing into tmp_path."""

    def _compose(*overrides: str, config_name: str = "train") -> DictConfig:
        return compose_config(tmp_path, prepared_root, *overrides, config_name=config_name)

    yield _compose
    GlobalHydra.instance().clear()


def compose_config(out_dir: Path, prepared_root: Path, *overrides: str, config_name: str = "train") -> DictConfig:
    """The composition behind `compose_train`, for fixtures of wider scope."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(
            config_name,
            overrides=[
                f"paths.runs_dir={out_dir / 'runs'}",
                f"paths.log_dir={out_dir / 'logs'}",
                f"data.prepared_root={prepared_root}",
                *overrides,
            ],
            return_hydra_config=True,
        )
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg.hydra  # train() sees what @hydra.main hands a task
    return cfg


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, prepared_root: Path) -> Path:
    """One tiny model trained and exported once per session: its run folder (checkpoints/best.ckpt, model.onnx)."""
    from cifarlab.train import train

    with pytest.MonkeyPatch.context() as patch:  # what the function-scoped `project_root` sets for tests
        patch.setenv("PROJECT_ROOT", str(ROOT))
        patch.delenv("CIFAR10_SOURCE", raising=False)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        cfg = compose_config(tmp_path_factory.mktemp("tiny_run"), prepared_root, *TINY, "logger=csv", "test=false")
        train(cfg)
    GlobalHydra.instance().clear()
    return Path(cfg.paths.output_dir)


def local_store(folder: Path) -> str:
    """A new local MLflow store (SQLite) under `folder`."""
    return f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}"


def isolated(work: Path, tracking_uri: str | None = None, prepared_root: Path | None = None) -> list[str]:
    """train.py overrides that keep a run's files under `work`: its runs, its logs, and, unless given, its prepared
    data and a new local MLflow store."""
    return [
        f"data.prepared_root={prepared_root or work / 'prepared'}",
        f"paths.runs_dir={work / 'runs'}",
        f"paths.log_dir={work / 'logs'}",
        f"logger.tracking_uri={tracking_uri or local_store(work)}",
    ]


@pytest.fixture
def tracking_uri(tmp_path: Path) -> str:
    return local_store(tmp_path)


def run_cli(
    *args: str, cwd: Path = ROOT, env: dict[str, str] | None = None, timeout: int = 300
) -> subprocess.CompletedProcess:
    """Run a repository entry point (train.py, eval.py, scripts/...) as a user would."""
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=cli_env(env), capture_output=True, text=True, timeout=timeout
    )


def cli_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment run_cli runs an entry point in: the suite's, without a data source or tracking server."""
    inherited = {k: v for k, v in os.environ.items() if k not in ("CIFAR10_SOURCE", "MLFLOW_TRACKING_URI")}
    return {**inherited, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **(env or {})}
