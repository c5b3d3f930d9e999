"""stratified_split, and CIFAR10DataModule end to end on a tiny generated image folder (3 classes)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cifarlab.data.augment import Augmentation
from cifarlab.data.datamodule import CIFAR10DataModule, stratified_split
from cifarlab.data.loader import InMemoryLoader

CLASSES = ("cat", "dog", "frog")
TRAIN_PER_CLASS, TEST_PER_CLASS = 10, 2
VAL_FRACTION = 0.2  # 2 of every class's 10 training images


# ------------------------------------------------------------------------------------------ stratified_split


@pytest.fixture
def labels() -> np.ndarray:
    counts = [10, 20, 5, 15]
    labels = np.repeat(np.arange(len(counts)), counts)
    return np.random.default_rng(0).permutation(labels)


def test_split_takes_the_fraction_of_every_class(labels):
    train, val = stratified_split(labels, 0.2, seed=0)
    assert np.bincount(labels[val]).tolist() == [2, 4, 1, 3]
    assert np.bincount(labels[train]).tolist() == [8, 16, 4, 12]


def test_split_is_a_sorted_partition(labels):
    train, val = stratified_split(labels, 0.2, seed=0)
    assert not set(train.tolist()) & set(val.tolist())
    assert sorted([*train.tolist(), *val.tolist()]) == list(range(len(labels)))
    assert np.array_equal(train, np.sort(train))
    assert np.array_equal(val, np.sort(val))
    assert np.issubdtype(train.dtype, np.integer)
    assert np.issubdtype(val.dtype, np.integer)


def test_split_is_deterministic_for_a_seed(labels):
    first_train, first_val = stratified_split(labels, 0.2, seed=7)
    again_train, again_val = stratified_split(labels.copy(), 0.2, seed=7)
    assert np.array_equal(first_train, again_train)
    assert np.array_equal(first_val, again_val)
    _, other_val = stratified_split(labels, 0.2, seed=8)
    assert not np.array_equal(first_val, other_val)
    assert np.bincount(labels[other_val]).tolist() == [2, 4, 1, 3]  # still stratified


@pytest.mark.parametrize(("fraction", "expected"), [(0.4, [4, 8, 2, 6]), (0.6, [6, 12, 3, 9])])
def test_split_fraction_per_class(labels, fraction, expected):
    train, val = stratified_split(labels, fraction, seed=0)
    assert np.bincount(labels[val], minlength=4).tolist() == expected
    assert len(train) + len(val) == len(labels)


def test_invalid_val_fraction_raises(tmp_path):
    for fraction in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="val_fraction"):
            CIFAR10DataModule(source=None, prepared_root=str(tmp_path), val_fraction=fraction)


# ----------------------------------------------------------------------------------------- CIFAR10DataModule


def write_image_folder(root: Path) -> dict[str, np.ndarray]:
    """train/<class>/*.png and test/<class>/*.png with random pixels; returns each split's images in the
    order prepare stacks them (by class in CLASSES order, then by file name)."""
    rng = np.random.default_rng(0)
    expected = {}
    for split, per_class in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        images = rng.integers(0, 256, size=(per_class * len(CLASSES), 32, 32, 3), dtype=np.uint8)
        for index, pixels in enumerate(images):
            label, position = divmod(index, per_class)
            path = root / split / CLASSES[label] / f"{position:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path)
        expected[split] = images
    return expected


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    root = tmp_path_factory.mktemp("source") / "tiny-cifar"
    return root, write_image_folder(root)


def make_datamodule(source: Path, prepared_root: Path, seed: int = 0, **kwargs) -> CIFAR10DataModule:
    return CIFAR10DataModule(
        source=str(source),
        prepared_root=str(prepared_root),
        batch_size=8,
        eval_batch_size=4,
        val_fraction=VAL_FRACTION,
        seed=seed,
        classes=CLASSES,
        **kwargs,
    )


@pytest.fixture(scope="module")
def prepared_copies(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("prepared")


@pytest.fixture(scope="module")
def datamodule(image_folder, prepared_copies) -> CIFAR10DataModule:
    source, _ = image_folder
    datamodule = make_datamodule(source, prepared_copies)
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def rows(images: torch.Tensor | np.ndarray) -> set[bytes]:
    return {bytes(image) for image in np.asarray(images).reshape(len(images), -1)}


def test_setup_builds_uint8_nhwc_splits_of_the_right_sizes(datamodule):
    val_count = round(TRAIN_PER_CLASS * VAL_FRACTION) * len(CLASSES)
    sizes = {
        "train": TRAIN_PER_CLASS * len(CLASSES) - val_count,
        "val": val_count,
        "test": TEST_PER_CLASS * len(CLASSES),
    }
    assert set(datamodule.splits) == set(sizes)
    for split, size in sizes.items():
        images, labels = datamodule.splits[split]
        assert images.shape == (size, 32, 32, 3)
        assert images.dtype == torch.uint8
        assert images.device.type == "cpu"
        assert labels.shape == (size,)
        assert labels.dtype == torch.int64
        assert np.bincount(labels.numpy(), minlength=3).tolist() == [size // 3] * 3
    assert datamodule.train_images is datamodule.splits["train"][0]
    assert datamodule.val_images is datamodule.splits["val"][0]
    assert datamodule.dataset.classes == CLASSES


def test_val_is_disjoint_from_train_and_both_come_from_the_training_split(datamodule, image_folder):
    _, expected = image_folder
    train, val = datamodule.splits["train"][0], datamodule.splits["val"][0]
    assert len(rows(train)) == len(train)
    assert not rows(train) & rows(val)
    assert rows(train) | rows(val) == rows(expected["train"])
    test = datamodule.splits["test"][0]
    assert len(rows(test)) == len(test) and rows(test) == rows(expected["test"])
    # labels still belong to their images: image k of a source split is class k // (its images per class)
    for split, source, per_class in (
        ("train", "train", TRAIN_PER_CLASS),
        ("val", "train", TRAIN_PER_CLASS),
        ("test", "test", TEST_PER_CLASS),
    ):
        flat = expected[source].reshape(len(expected[source]), -1)
        lookup = {bytes(image): index // per_class for index, image in enumerate(flat)}
        images, labels = datamodule.splits[split]
        assert [lookup[bytes(image)] for image in images.numpy().reshape(len(images), -1)] == labels.tolist()


def test_the_first_images_of_every_split_mix_the_classes(datamodule):
    """Prepared splits are stored shuffled, so a limited evaluation (limit_val_batches) sees several classes."""
    for split in ("train", "val", "test"):
        labels = datamodule.splits[split][1][:4]
        assert len(set(labels.tolist())) > 1, (split, labels)


def test_setup_is_idempotent(datamodule):
    before = datamodule.splits["train"][0]
    datamodule.setup("test")
    assert datamodule.splits["train"][0] is before


def test_another_seed_draws_another_val_split(image_folder, prepared_copies, datamodule):
    source, _ = image_folder
    other = make_datamodule(source, prepared_copies, seed=1)
    other.setup()
    assert len(other.val_images) == len(datamodule.val_images)
    assert rows(other.val_images) != rows(datamodule.val_images)
    assert other.dataset.manifest_sha256 == datamodule.dataset.manifest_sha256  # the prepared copy is reused


def test_train_batches_are_shuffled_and_augmented(datamodule):
    loader = datamodule.train_dataloader()
    assert isinstance(loader, InMemoryLoader)
    assert loader.shuffle
    assert loader.drop_last
    assert loader.augmentation == Augmentation()
    batches = list(loader)
    assert len(batches) == len(datamodule.train_images) // 8
    raw = rows(datamodule.train_images)
    for images, labels in batches:
        assert images.shape == (8, 32, 32, 3)
        assert images.dtype == torch.uint8
        assert labels.dtype == torch.int64
    drawn = torch.cat([images for images, _ in batches])
    unchanged = sum(row in raw for row in rows(drawn))
    assert unchanged < len(drawn) // 2  # most images were shifted or flipped
    drawn_labels = torch.cat([labels for _, labels in batches])
    assert sorted(drawn_labels.tolist()) == sorted(datamodule.splits["train"][1].tolist())


def test_train_augmentation_follows_the_configuration(image_folder, prepared_copies):
    source, _ = image_folder
    plain = make_datamodule(source, prepared_copies, augmentation=Augmentation(translate=0, flip="none"))
    plain.setup()
    drawn = torch.cat([images for images, _ in plain.train_dataloader()])
    assert rows(drawn) == rows(plain.train_images)


@pytest.mark.parametrize("split", ["val", "test"])
def test_eval_batches_are_neither_shuffled_nor_augmented(datamodule, split):
    loader = getattr(datamodule, f"{split}_dataloader")()
    assert loader.augmentation is None
    assert not loader.shuffle
    assert not loader.drop_last
    batches = list(loader)
    assert [len(labels) for _, labels in batches] == [4, 2]
    images, labels = datamodule.splits[split]
    assert torch.equal(torch.cat([b for b, _ in batches]), images)
    assert torch.equal(torch.cat([lab for _, lab in batches]), labels)
