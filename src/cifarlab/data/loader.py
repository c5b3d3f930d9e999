"""An in-memory batch iterator: the dataset is one uint8 tensor on the training device.

Each epoch draws a permutation from a generator seeded by (seed, epoch), so shuffling and augmentation are
identical whether a run goes straight through or resumes from a checkpoint, and every DDP rank draws the same
permutation and takes its own interleaved share of it. Lightning calls `sampler.set_epoch` before each epoch,
as it does for a DistributedSampler.
"""

from collections.abc import Iterator

import torch
from torch import Tensor

from cifarlab.data.augment import Augmentation


class _EpochSetter:
    def __init__(self) -> None:
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


class InMemoryLoader:
    batch_sampler = None  # with `sampler`, the DataLoader attributes Lightning inspects

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        batch_size: int,
        *,
        shuffle: bool = False,
        drop_last: bool = False,
        augmentation: Augmentation | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, labels
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.augmentation, self.seed = augmentation, seed
        self.rank, self.world_size = rank, world_size
        self.sampler = _EpochSetter()
        parity_generator = torch.Generator().manual_seed(seed)
        self.flip_parity = torch.randint(0, 2, (len(images),), generator=parity_generator).to(images.device)

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def _rank_indices(self) -> Tensor:
        count = len(self.images)
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(count, generator=generator)
        else:
            order = torch.arange(count)
        # Every rank gets the same number of samples (DDP steps in lockstep), so trim the tail.
        per_rank = count // self.world_size if self.world_size > 1 else count
        return order[self.rank :: self.world_size][:per_rank].to(self.images.device)

    def __len__(self) -> int:
        per_rank = len(self.images) // self.world_size if self.world_size > 1 else len(self.images)
        full, rest = divmod(per_rank, self.batch_size)
        return full if self.drop_last or rest == 0 else full + 1

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        indices = self._rank_indices()
        generator = torch.Generator(self.images.device)
        generator.manual_seed((self.seed * 100_003 + self.epoch) * 1_009 + self.rank)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            batch_indices = indices[start : start + self.batch_size]
            images = self.images[batch_indices]
            if self.augmentation is not None:
                images = self.augmentation(images, batch_indices, self.epoch, self.flip_parity, generator)
            yield images, self.labels[batch_indices]
