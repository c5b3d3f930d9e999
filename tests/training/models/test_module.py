"""ClassifierNet's preprocessing and flip TTA; ImageClassifier built from plain config dicts: its optimizer
groups, its schedule, and a checkpoint round trip through a one-step Lightning fit."""

import copy

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from cifarlab.data.augment import Augmentation
from cifarlab.data.loader import InMemoryLoader
from cifarlab.errors import ConfigError
from cifarlab.models.airbench import AirbenchNet
from cifarlab.models.baseline import BaselineCNN
from cifarlab.models.module import CIFAR10_MEAN, CIFAR10_STD, ClassifierNet, ImageClassifier, shift
from cifarlab.models.resnet import ResNet18
from cifarlab_contract.classes import CIFAR10_CLASSES

# Plain-dict twins of configs/model/*.yaml (net), configs/optimizer/*.yaml and configs/scheduler/*.yaml.
# The airbench widths are shrunk so that every test stays fast; the structure is the same.
AIRBENCH = {"_target_": "cifarlab.models.airbench.AirbenchNet", "widths": [8, 16, 16]}
BASELINE = {"_target_": "cifarlab.models.baseline.BaselineCNN", "widths": [4, 8, 8]}
RESNET18 = {"_target_": "cifarlab.models.resnet.ResNet18", "width": 4}
SGD = {"_target_": "torch.optim.SGD", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5.0e-4}
ADAMW = {"_target_": "torch.optim.AdamW", "lr": 2.0e-3, "weight_decay": 0.05}
TRIANGLE = {"_target_": "cifarlab.models.schedules.triangle", "peak_fraction": 0.2, "start": 0.1, "end": 0.0}


def uint8_images(count: int, height: int = 32, width: int = 32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, height, width, 3), dtype=torch.uint8, generator=generator)


def quiet_trainer(tmp_path, **kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kwargs,
    )


# --------------------------------------------------------------------------------------------- ClassifierNet


def test_preprocess_normalises_uint8_nhwc_to_nchw():
    net = ClassifierNet(nn.Identity())
    images = torch.zeros(2, 4, 5, 3, dtype=torch.uint8)
    images[1, 2, 3] = torch.tensor([10, 128, 250], dtype=torch.uint8)
    x = net.preprocess(images)
    assert x.shape == (2, 3, 4, 5)
    assert x.dtype == torch.float32
    # by hand: (value / 255 - mean) / std, channel by channel
    expected = [(10 / 255 - 0.4914) / 0.2470, (128 / 255 - 0.4822) / 0.2435, (250 / 255 - 0.4465) / 0.2616]
    for channel in range(3):
        assert x[1, channel, 2, 3].item() == pytest.approx(expected[channel], abs=1e-5)
        assert x[0, channel, 0, 0].item() == pytest.approx(-CIFAR10_MEAN[channel] / CIFAR10_STD[channel], abs=1e-5)


def test_preprocess_yields_channels_last_strides():
    net = ClassifierNet(nn.Identity())
    images = uint8_images(2, 4, 5)
    assert images.permute(0, 3, 1, 2).is_contiguous(memory_format=torch.channels_last)
    x = net.preprocess(images)
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert not x.is_contiguous()


def test_preprocess_uses_custom_mean_and_std():
    net = ClassifierNet(nn.Identity(), mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0))
    images = torch.full((1, 2, 2, 3), 255, dtype=torch.uint8)
    x = net.preprocess(images)
    torch.testing.assert_close(x[0, :, 0, 0], torch.tensor([2.0, 1.0, 0.5]))


class NotFlipInvariant(nn.Module):
    """A linear map of the whole image: mirroring the input changes its output."""

    def __init__(self, height: int, width: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(3 * height * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


def test_flip_tta_averages_image_and_mirror_in_eval_mode_only():
    backbone = NotFlipInvariant(4, 5)
    net = ClassifierNet(backbone, flip_tta=True)
    images = uint8_images(3, 4, 5)
    x = net.preprocess(images)
    plain, mirrored = backbone(x), backbone(x.flip(-1))
    assert (plain - mirrored).abs().max() > 1e-3  # otherwise the test could not tell TTA apart

    with torch.no_grad():
        net.eval()
        torch.testing.assert_close(net(images), (plain + mirrored) / 2)
        net.train()
        torch.testing.assert_close(net(images), plain)


def test_no_flip_tta_by_default():
    backbone = NotFlipInvariant(4, 5)
    net = ClassifierNet(backbone).eval()
    images = uint8_images(3, 4, 5)
    with torch.no_grad():
        torch.testing.assert_close(net(images), backbone(net.preprocess(images)))


def test_mirror_is_along_image_width():
    # The width axis of NHWC input is dim 2: TTA of an image equals TTA of its left-right mirror.
    net = ClassifierNet(NotFlipInvariant(4, 5), flip_tta=True).eval()
    images = uint8_images(2, 4, 5)
    with torch.no_grad():
        torch.testing.assert_close(net(images), net(images.flip(2)))
        assert (net(images) - net(images.flip(1))).abs().max() > 1e-4


def reflect_shift(x: torch.Tensor, down: int, right: int) -> torch.Tensor:
    """An independent shift: numpy's reflect padding, then the window moved by (down, right)."""
    pad = max(abs(down), abs(right))
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (pad, pad), (pad, pad)), mode="reflect")
    height, width = x.shape[-2:]
    return torch.from_numpy(padded[..., pad - down : pad - down + height, pad - right : pad - right + width].copy())


def test_shift_moves_content_with_reflection():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    moved = shift(x, 1, 1)
    torch.testing.assert_close(moved[0, 0, 1:, 1:], x[0, 0, :3, :3])  # content moved down-right
    torch.testing.assert_close(moved[0, 0, 0, 1:], x[0, 0, 1, :3])  # the new top row mirrors row 1
    for down, right in ((1, 1), (-1, -1), (2, -1), (0, 2)):
        torch.testing.assert_close(shift(x, down, right), reflect_shift(x, down, right))


def test_flip_translate_tta_is_the_weighted_mean_of_its_six_views():
    backbone = NotFlipInvariant(32, 32)
    net = ClassifierNet(backbone, flip_tta=True, translate_tta=1).eval()
    images = uint8_images(3)
    x = net.preprocess(images)
    with torch.no_grad():
        unshifted = [backbone(x), backbone(x.flip(-1))]
        shifted = []
        for s in (1, -1):
            moved = reflect_shift(x, s, s)
            shifted += [backbone(moved), backbone(moved.flip(-1))]
        # the two unshifted views weigh as much as the four shifted ones together (airbench's TTA level 2)
        expected = sum(unshifted) / 4 + sum(shifted) / 8
        torch.testing.assert_close(net(images), expected)
        assert (expected - sum(unshifted) / 2).abs().max() > 1e-3  # translation changes the answer
        net.train()
        torch.testing.assert_close(net(images), backbone(x))


def test_translate_tta_without_flip_averages_three_views():
    backbone = NotFlipInvariant(32, 32)
    net = ClassifierNet(backbone, translate_tta=2).eval()
    images = uint8_images(2)
    x = net.preprocess(images)
    with torch.no_grad():
        expected = backbone(x) / 2 + (backbone(reflect_shift(x, 2, 2)) + backbone(reflect_shift(x, -2, -2))) / 4
        torch.testing.assert_close(net(images), expected)


def test_negative_translate_tta_is_refused():
    with pytest.raises(ValueError, match="translate_tta"):
        ClassifierNet(nn.Identity(), translate_tta=-1)


# ------------------------------------------------------------------------------------------- ImageClassifier


@pytest.mark.parametrize(
    ("net_cfg", "net_type"),
    [(AIRBENCH, AirbenchNet), (BASELINE, BaselineCNN), (RESNET18, ResNet18)],
    ids=["airbench", "baseline", "resnet18"],
)
def test_image_classifier_from_plain_dicts(net_cfg, net_type):
    model = ImageClassifier(net=net_cfg, optimizer=SGD, scheduler=TRIANGLE, class_names=("a", "b", "c"))
    assert isinstance(model.net, ClassifierNet)
    assert isinstance(model.net.backbone, net_type)
    assert model.class_names == ("a", "b", "c")
    assert model.hparams.optimizer == SGD
    assert model.hparams.scheduler == TRIANGLE
    model.eval()
    with torch.no_grad():
        logits = model(uint8_images(2))
    assert logits.shape == (2, 3)


def test_image_classifier_defaults_to_cifar10_classes_and_channels_last():
    model = ImageClassifier(net=AIRBENCH, optimizer=SGD)
    assert model.class_names == CIFAR10_CLASSES
    assert model.net.backbone.head.out_features == 10
    conv = model.net.backbone.groups[0].conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    plain = ImageClassifier(net=AIRBENCH, optimizer=SGD, channels_last=False)
    assert plain.net.backbone.groups[0].conv1.weight.is_contiguous()


def norm_modules(model: ImageClassifier) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@pytest.mark.parametrize("optimizer_cfg", [SGD, ADAMW], ids=["sgd", "adamw"])
def test_configure_optimizers_scales_norm_biases(optimizer_cfg):
    model = ImageClassifier(net=AIRBENCH, optimizer=optimizer_cfg, scheduler=None, norm_bias_lr_scale=64.0)
    config = model.configure_optimizers()
    assert set(config) == {"optimizer"}
    optimizer = config["optimizer"]
    assert type(optimizer).__name__ == optimizer_cfg["_target_"].rsplit(".", 1)[-1]
    others, norm_biases = optimizer.param_groups
    lr, weight_decay = optimizer_cfg["lr"], optimizer_cfg["weight_decay"]
    assert others["lr"] == pytest.approx(lr)
    assert others["weight_decay"] == pytest.approx(weight_decay)
    assert norm_biases["lr"] == pytest.approx(lr * 64)
    assert norm_biases["weight_decay"] == pytest.approx(weight_decay / 64)

    norms = norm_modules(model)
    assert len(norms) == 6  # two per conv group
    assert {id(p) for p in norm_biases["params"]} == {id(m.bias) for m in norms}
    assert len(norm_biases["params"]) == len(norms)

    backbone = model.net.backbone
    frozen = [backbone.whiten.weight, *(m.weight for m in norms)]
    grouped = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert len(grouped) == len(set(grouped))  # no parameter twice
    assert not {id(p) for p in frozen} & set(grouped)
    assert set(grouped) == {id(p) for p in model.parameters() if p.requires_grad}
    assert id(backbone.whiten.bias) in {id(p) for p in others["params"]}
    assert id(backbone.head.weight) in {id(p) for p in others["params"]}


@pytest.mark.parametrize("net_cfg", [BASELINE, RESNET18], ids=["baseline", "resnet18"])
def test_norm_bias_group_for_networks_with_learnable_norm_scales(net_cfg):
    model = ImageClassifier(net=net_cfg, optimizer=SGD, norm_bias_lr_scale=64.0)
    others, norm_biases = model.configure_optimizers()["optimizer"].param_groups
    norms = norm_modules(model)
    assert {id(p) for p in norm_biases["params"]} == {id(m.bias) for m in norms}
    # BatchNorm scales (weights) are learnable here and stay at the base rate
    assert {id(m.weight) for m in norms} <= {id(p) for p in others["params"]}
    total = len(others["params"]) + len(norm_biases["params"])
    assert total == len(list(model.parameters()))


def test_unscaled_norm_biases_share_one_group():
    model = ImageClassifier(net=AIRBENCH, optimizer=SGD, norm_bias_lr_scale=1.0)
    (group,) = model.configure_optimizers()["optimizer"].param_groups
    assert group["lr"] == pytest.approx(SGD["lr"])
    assert group["weight_decay"] == pytest.approx(SGD["weight_decay"])
    assert {id(p) for p in group["params"]} == {id(p) for p in model.parameters() if p.requires_grad}
    assert id(model.net.backbone.whiten.weight) not in {id(p) for p in group["params"]}


MUON = {"_target_": "cifarlab.models.optim.Muon", "lr": 0.24, "momentum": 0.6, "ns_steps": 3}
SPEEDRUN_GROUPS = {
    "biases": {"params": ["*whiten.bias", "*norm*.bias"], "orthogonalize": False, "lr": 106.0, "momentum": 0.85},
    "head": {"params": ["*head.weight"], "orthogonalize": False, "lr": 1.656, "weight_decay": 2.4e-3},
}


def test_named_param_groups_take_their_own_options():
    model = ImageClassifier(net=AIRBENCH, optimizer=MUON, param_groups=SPEEDRUN_GROUPS)
    optimizer = model.configure_optimizers()["optimizer"]
    biases, head, default = optimizer.param_groups
    assert [g["name"] for g in optimizer.param_groups] == ["biases", "head", "default"]
    backbone = model.net.backbone
    assert {id(p) for p in biases["params"]} == {id(backbone.whiten.bias)} | {id(m.bias) for m in norm_modules(model)}
    assert biases["lr"] == 106.0 and biases["momentum"] == 0.85 and biases["orthogonalize"] is False
    assert biases["ns_steps"] == 3  # options a group does not set come from the optimizer
    assert [id(p) for p in head["params"]] == [id(backbone.head.weight)]
    assert head["weight_decay"] == 2.4e-3 and head["momentum"] == 0.6
    # what is left is every conv filter bank, at the optimizer's own options
    assert all(p.ndim == 4 for p in default["params"]) and len(default["params"]) == 6
    assert default["lr"] == 0.24 and default["orthogonalize"] is True


def test_a_param_group_matching_nothing_is_a_config_error():
    with pytest.raises(ConfigError, match=r"param_groups.typo: no trainable parameter matches \['\*hed.weight'\]"):
        ImageClassifier(net=AIRBENCH, optimizer=MUON, param_groups={"typo": {"params": ["*hed.weight"]}}).param_groups()


def test_param_groups_and_norm_bias_scale_exclude_each_other():
    with pytest.raises(ConfigError, match="not both"):
        ImageClassifier(net=AIRBENCH, optimizer=SGD, param_groups=SPEEDRUN_GROUPS, norm_bias_lr_scale=64.0)


def test_scheduler_steps_every_batch_and_scales_both_groups(tmp_path):
    model = ImageClassifier(net=AIRBENCH, optimizer=SGD, scheduler=TRIANGLE, norm_bias_lr_scale=64.0)
    model.trainer = quiet_trainer(tmp_path, max_epochs=-1, max_steps=10)
    config = model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    assert isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR)
    others, norm_biases = optimizer.param_groups
    assert others["initial_lr"] == pytest.approx(0.05)
    assert norm_biases["initial_lr"] == pytest.approx(0.05 * 64)
    assert others["lr"] == pytest.approx(0.05 * TRIANGLE["start"])  # step 0 of the warm-up
    for _ in range(2):  # peak at 0.2 x 10 steps = step 2
        optimizer.step()
        scheduler.step()
    assert others["lr"] == pytest.approx(0.05)
    assert norm_biases["lr"] == pytest.approx(0.05 * 64)


def test_hyperparameters_are_plain_containers():
    from omegaconf import OmegaConf

    model = ImageClassifier(
        net=OmegaConf.create(AIRBENCH), optimizer=OmegaConf.create(SGD), scheduler=OmegaConf.create(TRIANGLE)
    )
    for name, expected in (("net", AIRBENCH), ("optimizer", SGD), ("scheduler", TRIANGLE)):
        assert type(model.hparams[name]) is dict
        assert model.hparams[name] == expected


# ------------------------------------------------------------------------------------------- checkpoints


class TinyDataModule(L.LightningDataModule):
    """Two training batches of random images, held in memory like CIFAR10DataModule."""

    def __init__(self, count: int = 16, batch_size: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.images = uint8_images(count, seed=1)
        self.labels = torch.arange(count) % classes
        self.batch_size = batch_size

    @property
    def train_images(self) -> torch.Tensor:
        return self.images

    def train_dataloader(self) -> InMemoryLoader:
        return InMemoryLoader(
            self.images, self.labels, self.batch_size, shuffle=True, drop_last=True, augmentation=Augmentation()
        )


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    datamodule = TinyDataModule()
    assert len(datamodule.train_dataloader()) == 2
    model = ImageClassifier(
        net=AIRBENCH,
        optimizer=SGD,
        scheduler=TRIANGLE,
        class_names=("a", "b", "c"),
        norm_bias_lr_scale=64.0,
        flip_tta=True,
    )
    before = copy.deepcopy(model.state_dict())
    trainer = quiet_trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(model, datamodule=datamodule)
    assert trainer.global_step == 1
    assert bool(model.net.backbone.whitening_fitted)  # fitted at fit start, from the datamodule's images
    changed = [name for name, value in model.state_dict().items() if not torch.equal(value, before[name])]
    assert "net.backbone.whiten.weight" in changed
    assert "net.backbone.head.weight" in changed  # one optimizer step was taken

    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    loaded = ImageClassifier.load_from_checkpoint(path, weights_only=False)
    assert loaded.class_names == ("a", "b", "c")
    assert loaded.hparams.net == AIRBENCH
    assert loaded.hparams.norm_bias_lr_scale == 64.0
    assert bool(loaded.net.backbone.whitening_fitted)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value, rtol=0, atol=0, msg=name)

    images = uint8_images(4, seed=2)
    model.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model(images), rtol=0, atol=0)


def test_airbench_refuses_to_fit_without_a_datamodule(tmp_path):
    model = ImageClassifier(net=AIRBENCH, optimizer=SGD)
    loader = TinyDataModule().train_dataloader()
    trainer = quiet_trainer(tmp_path, max_steps=1, limit_val_batches=0)
    with pytest.raises(RuntimeError, match="datamodule"):
        trainer.fit(model, train_dataloaders=loader)
    assert not bool(model.net.backbone.whitening_fitted)
