"""experiment=speedrun end to end on the CPU (tiny widths, float32), and the training hot path's host syncs."""

import json

import pytest
import torch
from mlflow import MlflowClient

from cifarlab.models.optim import Muon
from cifarlab.train import train
from tests.conftest import TINY

pytestmark = pytest.mark.slow  # trains the speedrun recipe

SPEEDRUN_ON_CPU = [*TINY, "experiment=speedrun", "trainer.accelerator=cpu", "trainer.precision=32-true"]


def test_speedrun_trains_with_muon_and_tta_and_never_syncs_per_step(compose_train, tracking_uri, tmp_path):
    guard = tmp_path / "syncs.json"
    cfg = compose_train(
        *SPEEDRUN_ON_CPU,
        f"logger.tracking_uri={tracking_uri}",
        "+callbacks.sync_guard._target_=tests.helpers.HostSyncGuard",
        f"+callbacks.sync_guard.path={guard}",
        "+callbacks.clock._target_=cifarlab.callbacks.timing.TrainingClock",
        "+callbacks.clock.path=${paths.output_dir}/timing.json",
    )
    # the recipe as composed: what makes it fast
    assert cfg.optimizer._target_ == "cifarlab.models.optim.Muon"
    assert cfg.data.augmentation.flip == "alternate" and cfg.data.augmentation.translate == 2
    assert cfg.model.flip_tta and cfg.model.translate_tta == 1 and cfg.model.channels_last
    assert cfg.model.label_smoothing == 0.2
    assert cfg.trainer.check_val_every_n_epoch == cfg.trainer.max_epochs == 2

    train(cfg)

    syncs = json.loads(guard.read_text())
    assert syncs["steps"] == 6  # debug=limit: 2 epochs x 3 batches; 4 whole step cycles watched
    assert syncs["per_step"] == [], f"host syncs in the training hot path: {syncs['per_step']}"
    # the guard sees what it should, outside the steps only: the console's epoch lines read their scalars (item,
    # __float__), and Lightning checks the validation loader's length across ranks
    assert syncs["epoch_end"] == ["item", "item", "__float__", "__float__", "__bool__", "__bool__"]

    run_dir = tmp_path / "runs" / cfg.run_id
    checkpoint = torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=False)
    hparams = checkpoint["hyper_parameters"]
    assert hparams["translate_tta"] == 1 and set(hparams["param_groups"]) == {"biases", "head"}
    (optimizer_state,) = checkpoint["optimizer_states"]
    groups = optimizer_state["param_groups"]
    assert [g["name"] for g in groups] == ["biases", "head", "default"]
    assert [g["orthogonalize"] for g in groups] == [False, False, True]
    # the linear decay reached zero with the last step
    assert all(g["lr"] == pytest.approx(0.0, abs=1e-9) for g in groups)

    timing = json.loads((run_dir / "timing.json").read_text())
    assert len(timing["epoch_seconds"]) == 2 and timing["train_seconds"] >= sum(timing["epoch_seconds"])
    assert (run_dir / "model.onnx").is_file()  # exported (TTA inside) and verified against PyTorch
    metrics = MlflowClient(tracking_uri).get_run(cfg.run_id).data.metrics
    assert 0.0 < metrics["test/acc"] <= 1.0


def test_speedrun_optimizer_is_muon_with_decoupled_groups(compose_train):
    from hydra.utils import instantiate

    cfg = compose_train(*SPEEDRUN_ON_CPU)
    model = instantiate(cfg.model, optimizer=cfg.optimizer, scheduler=cfg.scheduler, _recursive_=False)
    optimizer = instantiate(cfg.optimizer, _partial_=True)(model.param_groups())
    assert isinstance(optimizer, Muon)
    biases, head, filters = optimizer.param_groups
    assert biases["lr"] == 106.0 and head["lr"] == pytest.approx(1.656) and filters["lr"] == 0.24
    # every group decays by the same 0.004 per step at full rate: lr x weight_decay
    for group in (biases, head):
        assert group["lr"] * group["weight_decay"] == pytest.approx(0.004, rel=1e-3)
    assert filters["normalize_weights"] and filters["ns_steps"] == 3
