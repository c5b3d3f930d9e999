"""Every Hydra config option composes, resolves and instantiates (datamodule and model, without data)."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import MissingConfigException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from cifarlab.data.augment import Augmentation
from cifarlab.data.datamodule import CIFAR10DataModule
from cifarlab.models.module import ImageClassifier
from tests.conftest import CONFIGS as CONFIG_DIR
from tests.conftest import ROOT

GROUPS = (
    "model",
    "data",
    "optimizer",
    "scheduler",
    "trainer",
    "logger",
    "callbacks",
    "paths",
    "debug",
    "experiment",
    "hparams_search",
)


def options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONFIG_DIR / group).glob("*.yaml"))


OVERRIDES = [f"{group}={option}" for group in GROUPS for option in options(group)] + [
    "hydra/launcher=slurm",
    "hydra/launcher=slurm_cpu",
]


@pytest.fixture(autouse=True)
def environment(monkeypatch):
    monkeypatch.setenv("PROJECT_ROOT", str(ROOT))
    monkeypatch.delenv("CIFAR10_SOURCE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def compose_config(overrides: list[str] = (), config_name: str = "train") -> DictConfig:
    GlobalHydra.instance().clear()  # whatever another test left initialised
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)


def missing_keys(node: DictConfig | ListConfig, prefix: str = "") -> list[str]:
    """Keys whose value is literally ??? (interpolations are not resolved)."""
    found = []
    keys = node.keys() if isinstance(node, DictConfig) else range(len(node))
    for key in keys:
        child = node._get_node(key)
        name = f"{prefix}{key}"
        if child._is_missing():
            found.append(name)
        elif isinstance(child, DictConfig | ListConfig) and not child._is_none() and not child._is_interpolation():
            found += missing_keys(child, f"{name}.")
    return found


def targets(value) -> list[str]:
    if isinstance(value, dict):
        own = [value["_target_"]] if "_target_" in value else []
        return own + [t for child in value.values() for t in targets(child)]
    if isinstance(value, list):
        return [t for child in value for t in targets(child)]
    return []


def resolved_job_config(cfg: DictConfig, tmp_path: Path) -> dict:
    """What train.py resolves once the run id is known: everything but Hydra's own node."""
    job = cfg.copy()
    with open_dict(job):
        del job["hydra"]
        job.run_id = "0123abcd"
        job.paths.output_dir = str(tmp_path / "runs" / job.run_id)
    return OmegaConf.to_container(job, resolve=True, throw_on_missing=True)


def test_every_group_has_options():
    for group in GROUPS:
        assert options(group), group
    assert "airbench" in options("model")
    assert len(OVERRIDES) == sum(len(options(group)) for group in GROUPS) + 2  # and the two SLURM launchers


@pytest.mark.parametrize("override", OVERRIDES)
def test_option_composes_resolves_and_instantiates(override, tmp_path):
    cfg = compose_config([override])
    assert [key for key in missing_keys(cfg) if not key.startswith("hydra.")] == ["paths.output_dir"]
    assert cfg.run_id is None
    assert cfg.paths.root_dir == str(ROOT)

    resolved = resolved_job_config(cfg, tmp_path)
    assert resolved["paths"]["output_dir"] == str(tmp_path / "runs" / "0123abcd")
    for target in targets(resolved):
        assert callable(get_object(target)), target

    datamodule = instantiate(cfg.data)
    assert isinstance(datamodule, CIFAR10DataModule)
    assert datamodule.dataset is None  # nothing was read
    assert datamodule.batch_size == cfg.data.batch_size
    assert datamodule.classes == tuple(cfg.data.classes)
    assert datamodule.seed == cfg.seed
    assert isinstance(datamodule.augmentation, Augmentation)
    assert datamodule.augmentation.flip == cfg.data.augmentation.flip

    model = instantiate(cfg.model, optimizer=cfg.optimizer, scheduler=cfg.get("scheduler"), _recursive_=False)
    assert isinstance(model, ImageClassifier)
    assert type(model.net.backbone).__name__ == cfg.model.net._target_.rsplit(".", 1)[-1]
    assert model.class_names == tuple(cfg.data.classes)
    assert model.hparams.optimizer == OmegaConf.to_container(cfg.optimizer, resolve=True)
    assert model.hparams.scheduler == OmegaConf.to_container(cfg.scheduler, resolve=True)
    assert model.hparams.label_smoothing == cfg.model.label_smoothing

    assert cfg.trainer._target_ == "lightning.pytorch.Trainer"
    assert get_object(cfg.trainer._target_).__name__ == "Trainer"
    if cfg.logger is None:  # Lightning's LearningRateMonitor refuses to run without a logger
        callbacks = [c for c in (resolved["callbacks"] or {}).values() if c is not None]
        assert not any(c["_target_"].endswith("LearningRateMonitor") for c in callbacks)


def test_defaults():
    cfg = compose_config()
    assert cfg.trainer.accelerator == "auto"
    assert cfg.trainer.devices == 1
    assert cfg.model.net._target_ == "cifarlab.models.airbench.AirbenchNet"
    assert cfg.optimizer._target_ == "torch.optim.SGD"
    assert cfg.scheduler._target_ == "cifarlab.models.schedules.triangle"
    assert cfg.logger._target_ == "cifarlab.tracking.mlflow_logger"
    assert set(cfg.callbacks) == {"model_checkpoint", "last_checkpoint", "onnx_export", "lr_monitor"}
    assert cfg.data.source == f"{ROOT}/data/cifar10-sample.tar.gz"
    assert cfg.data.prepared_root == f"{ROOT}/data/prepared"
    assert cfg.data.seed == cfg.seed == 42
    assert cfg.data.augmentation.flip == "alternate"
    # the quick first model of `make train` (docs/results.md, "The default run"): measured, not guessed
    assert list(cfg.model.net.widths) == [32, 96, 96] and cfg.model.flip_tta is True
    assert (cfg.data.batch_size, cfg.optimizer.lr, cfg.trainer.max_epochs) == (256, 0.2, 16)
    assert cfg.task_name == "train"
    assert cfg.hydra.job.chdir is False


def test_data_source_follows_the_environment(monkeypatch):
    monkeypatch.setenv("CIFAR10_SOURCE", "/somewhere/cifar-10-python.tar.gz")
    assert compose_config().data.source == "/somewhere/cifar-10-python.tar.gz"


@pytest.mark.parametrize(
    ("option", "accelerator"), [("default", "auto"), ("cpu", "cpu"), ("gpu", "gpu"), ("mps", "mps"), ("ddp", "auto")]
)
def test_trainer_accelerators(option, accelerator):
    cfg = compose_config([f"trainer={option}"])
    assert cfg.trainer.accelerator == accelerator
    assert cfg.trainer.max_epochs == 16  # every trainer option extends the default one
    if option == "ddp":
        assert cfg.trainer.strategy == "ddp"


def test_cpu_airbench_experiment():
    cfg = compose_config(["experiment=cpu_airbench"])
    assert cfg.model.net._target_ == "cifarlab.models.airbench.AirbenchNet"
    assert cfg.data.batch_size == 512
    assert cfg.data.augmentation.flip == "alternate"
    assert cfg.trainer.max_epochs == 12
    assert list(cfg.model.net.widths) == [32, 128, 128]
    assert cfg.trainer.accelerator == "cpu"
    assert cfg.model.norm_bias_lr_scale == 64.0
    assert cfg.model.label_smoothing == 0.2
    assert cfg.model.flip_tta is True
    assert cfg.optimizer._target_ == "torch.optim.SGD"
    assert cfg.optimizer.lr == 0.75
    assert cfg.scheduler._target_ == "cifarlab.models.schedules.triangle"
    assert cfg.scheduler.start == 0.2
    assert cfg.run_name == "cpu_airbench"


def test_cpu_speedrun_is_the_speedrun_recipe_narrowed_for_a_cpu():
    speedrun = OmegaConf.to_container(compose_config(["experiment=speedrun"]), resolve=False)
    cpu = OmegaConf.to_container(compose_config(["experiment=cpu_speedrun"]), resolve=False)
    changed = {
        ("run_name",): ("speedrun", "cpu_speedrun"),
        ("model", "net", "widths"): ([64, 256, 256], [48, 192, 192]),
        ("trainer", "accelerator"): ("gpu", "cpu"),
        ("trainer", "precision"): ("bf16-mixed", "32-true"),
        ("trainer", "max_epochs"): (8, 10),
    }
    for keys, (gpu_value, cpu_value) in changed.items():
        a, b = speedrun, cpu
        for key in keys:
            a, b = a[key], b[key]
        assert (a, b) == (gpu_value, cpu_value), keys
        _set(speedrun, keys, cpu_value)
    del speedrun["hydra"], cpu["hydra"]  # the runtime choices name the experiment
    assert cpu == speedrun  # nothing else differs: optimizer groups, schedule, augmentation, TTA


def _set(tree: dict, keys: tuple[str, ...], value: object) -> None:
    for key in keys[:-1]:
        tree = tree[key]
    tree[keys[-1]] = value


def test_experiment_values_can_be_overridden():
    cfg = compose_config(["experiment=cpu_airbench", "data.batch_size=64", "trainer.max_epochs=1"])
    assert cfg.data.batch_size == 64
    assert cfg.trainer.max_epochs == 1
    assert cfg.data.augmentation.flip == "alternate"


def test_logger_none_disables_logging():
    cfg = compose_config(["logger=none"])
    assert "logger" in cfg
    assert cfg.logger is None
    assert cfg.callbacks.model_checkpoint is not None


def test_callbacks_none_disables_callbacks():
    assert len(compose_config(["callbacks=none"]).callbacks) == 0


def test_debug_fast_dev_run():
    cfg = compose_config(["debug=fast_dev_run"])
    assert cfg.trainer.fast_dev_run is True
    assert cfg.trainer.accelerator == "cpu"
    assert cfg.logger is None


def test_debug_overfit_turns_augmentation_off():
    cfg = compose_config(["debug=overfit"])
    assert cfg.trainer.overfit_batches == 2
    assert cfg.data.augmentation.translate == 0
    assert cfg.data.augmentation.flip == "none"
    assert cfg.logger is None


def test_hparams_search_uses_the_optuna_sweeper():
    cfg = compose_config(["hparams_search=optuna"])
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert cfg.hydra.sweeper.direction == "maximize"
    assert set(cfg.hydra.sweeper.params) == {"optimizer.lr", "optimizer.weight_decay", "model.label_smoothing"}
    assert cfg.optimized_metric == "val/acc_best"


def test_slurm_launcher():
    cfg = compose_config(["hydra/launcher=slurm"])
    assert cfg.hydra.launcher._target_ == "hydra_plugins.cifarlab_launcher.slurm.SlurmLauncher"
    assert cfg.hydra.launcher.timeout_min == 120
    assert cfg.hydra.launcher.gpus_per_node == 1
    cpu = compose_config(["hydra/launcher=slurm_cpu"]).hydra.launcher
    assert cpu._target_ == cfg.hydra.launcher._target_ and cpu.timeout_min == 120
    assert (cpu.gpus_per_node, cpu.cpus_per_task, cpu.mem_gb) == (None, 1, 4)


@pytest.mark.parametrize("group", ["model", "optimizer", "trainer"])
def test_unknown_option_lists_the_available_ones(group):
    with pytest.raises(MissingConfigException) as error:
        compose_config([f"{group}=nope"])
    message = str(error.value)
    assert f"Could not find '{group}/nope'" in message
    assert f"Available options in '{group}'" in message
    for option in options(group):
        assert option in message


def test_eval_config_composes(tmp_path):
    cfg = compose_config(config_name="eval")
    assert [key for key in missing_keys(cfg) if not key.startswith("hydra.")] == ["paths.output_dir"]
    assert cfg.task_name == "eval"
    assert cfg.ckpt_path is None
    assert cfg.onnx_path is None
    assert cfg.batch_size == 1024
    assert "model" not in cfg
    assert "trainer" not in cfg
    resolved = resolved_job_config(cfg, tmp_path)
    assert resolved["data"]["source"] == f"{ROOT}/data/cifar10-sample.tar.gz"
    datamodule = instantiate(cfg.data)
    assert isinstance(datamodule, CIFAR10DataModule)
    assert datamodule.seed == cfg.seed


def test_eval_config_takes_a_model_path():
    cfg = compose_config(["onnx_path=runs/abc/model.onnx"], config_name="eval")
    assert cfg.onnx_path == "runs/abc/model.onnx"
