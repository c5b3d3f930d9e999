"""The CIFAR-10 LightningDataModule: prepared uint8 arrays, held whole on the training device."""

from collections.abc import Sequence

import lightning as L
import numpy as np
import torch
from torch import Tensor

from cifarlab.data.augment import Augmentation
from cifarlab.data.loader import InMemoryLoader
from cifarlab.data.prepare import OFFICIAL_URL, PreparedDataset, ensure_prepared
from cifarlab_contract.classes import CIFAR10_CLASSES


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val) with `fraction` of every class in val, drawn by a seeded generator."""
    rng = np.random.default_rng(seed)
    val_parts = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        val_parts.append(members[: round(len(members) * fraction)])
    val = np.sort(np.concatenate(val_parts))
    train = np.setdiff1d(np.arange(len(labels)), val, assume_unique=True)
    return train, val


class CIFAR10DataModule(L.LightningDataModule):
    def __init__(
        self,
        source: str | None,
        prepared_root: str,
        batch_size: int = 512,
        eval_batch_size: int = 1024,
        val_fraction: float = 0.1,
        seed: int = 0,
        classes: Sequence[str] | None = CIFAR10_CLASSES,
        url: str = OFFICIAL_URL,
        expected_md5: str | None = None,
        augmentation: Augmentation | None = None,
        shuffle: bool = True,
    ) -> None:
        super().__init__()
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be between 0 and 1, not {val_fraction}")
        self.source, self.prepared_root = source, prepared_root
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.val_fraction, self.seed = val_fraction, seed
        self.classes = tuple(classes) if classes is not None else None
        self.url, self.expected_md5 = url, expected_md5
        self.augmentation = augmentation or Augmentation()
        self.shuffle = shuffle  # off only to overfit the same batches (Lightning re-orders only DataLoaders)
        self.dataset: PreparedDataset | None = None
        self.splits: dict[str, tuple[Tensor, Tensor]] = {}

    def load(self) -> PreparedDataset:
        """Prepare the source if needed and load it (cheap once prepared); usable without a Trainer."""
        if self.dataset is None:
            self.dataset = ensure_prepared(
                self.source,
                self.prepared_root,
                classes=self.classes,
                url=self.url,
                expected_md5=self.expected_md5,
            )
        return self.dataset

    def prepare_data(self) -> None:
        self.load()

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        dataset = self.load()
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")

        def to_device(images: np.ndarray, labels: np.ndarray) -> tuple[Tensor, Tensor]:
            return torch.from_numpy(images).to(device), torch.from_numpy(labels).to(device)

        train_idx, val_idx = stratified_split(dataset.train.labels, self.val_fraction, self.seed)
        self.splits = {
            "train": to_device(dataset.train.images[train_idx], dataset.train.labels[train_idx]),
            "val": to_device(dataset.train.images[val_idx], dataset.train.labels[val_idx]),
            "test": to_device(dataset.test.images, dataset.test.labels),
        }

    @property
    def train_images(self) -> Tensor:
        return self.splits["train"][0]

    @property
    def val_images(self) -> Tensor:
        return self.splits["val"][0]

    def _rank_and_world(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def _loader(self, split: str, train: bool) -> InMemoryLoader:
        images, labels = self.splits[split]
        rank, world_size = self._rank_and_world()
        return InMemoryLoader(
            images,
            labels,
            self.batch_size if train else self.eval_batch_size,
            shuffle=train and self.shuffle,
            drop_last=train,
            augmentation=self.augmentation if train else None,
            seed=self.seed,
            rank=rank,
            world_size=world_size,
        )

    def train_dataloader(self) -> InMemoryLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> InMemoryLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> InMemoryLoader:
        return self._loader("test", train=False)
