"""InMemoryLoader: batch counts, order, (seed, epoch)-determined shuffling, DDP sharding and reproducible
augmentation."""

import pytest
import torch

from cifarlab.data.augment import Augmentation
from cifarlab.data.loader import InMemoryLoader


def dataset(count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Tiny random images; the label of each image is its dataset index, so batches tell which were drawn."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, 6, 6, 3), dtype=torch.uint8, generator=generator)
    return images, torch.arange(count)


def epoch_indices(loader: InMemoryLoader) -> list[int]:
    return [index for _, labels in loader for index in labels.tolist()]


@pytest.mark.parametrize(
    ("count", "batch_size", "drop_last", "batches"),
    [(10, 4, False, 3), (10, 4, True, 2), (12, 4, False, 3), (12, 4, True, 3), (3, 4, False, 1), (3, 4, True, 0)],
)
def test_number_of_batches(count, batch_size, drop_last, batches):
    images, labels = dataset(count)
    loader = InMemoryLoader(images, labels, batch_size, drop_last=drop_last)
    assert len(loader) == batches
    sizes = [len(batch_labels) for _, batch_labels in loader]
    assert len(sizes) == batches
    expected = [batch_size] * (count // batch_size) + (
        [] if drop_last or count % batch_size == 0 else [count % batch_size]
    )
    assert sizes == expected


@pytest.mark.parametrize(("drop_last", "batches"), [(False, 2), (True, 1)])
def test_number_of_batches_per_rank(drop_last, batches):
    images, labels = dataset(11)  # 5 per rank after trimming the tail
    for rank in range(2):
        loader = InMemoryLoader(images, labels, 4, drop_last=drop_last, rank=rank, world_size=2)
        assert len(loader) == batches
        assert len(list(loader)) == batches


def test_unshuffled_epoch_yields_every_sample_once_in_order():
    images, labels = dataset(10)
    loader = InMemoryLoader(images, labels, 3)
    batches = list(loader)
    assert torch.equal(torch.cat([b for b, _ in batches]), images)
    assert torch.equal(torch.cat([lab for _, lab in batches]), labels)
    assert all(b.dtype == torch.uint8 for b, _ in batches)


def test_shuffled_epoch_is_a_permutation():
    images, labels = dataset(10)
    loader = InMemoryLoader(images, labels, 3, shuffle=True)
    batches = list(loader)
    order = torch.cat([lab for _, lab in batches])
    assert sorted(order.tolist()) == list(range(10))
    assert order.tolist() != list(range(10))
    assert torch.equal(torch.cat([b for b, _ in batches]), images[order])  # images stay paired with labels


def test_shuffle_depends_on_seed_and_epoch_only():
    images, labels = dataset(32)
    first = InMemoryLoader(images, labels, 8, shuffle=True, seed=3)
    second = InMemoryLoader(images, labels, 8, shuffle=True, seed=3)
    epoch0 = epoch_indices(first)
    assert epoch_indices(first) == epoch0  # iterating again without set_epoch repeats the epoch
    assert epoch_indices(second) == epoch0

    first.sampler.set_epoch(1)
    assert first.epoch == 1
    epoch1 = epoch_indices(first)
    assert epoch1 != epoch0
    assert sorted(epoch1) == list(range(32))

    second.sampler.set_epoch(5)
    epoch_indices(second)
    second.sampler.set_epoch(1)  # going back selects that epoch's order again, whatever came before
    assert epoch_indices(second) == epoch1
    second.sampler.set_epoch(0)
    assert epoch_indices(second) == epoch0

    other_seed = InMemoryLoader(images, labels, 8, shuffle=True, seed=4)
    assert epoch_indices(other_seed) != epoch0


def test_epoch_starts_at_zero_and_does_not_affect_unshuffled_order():
    images, labels = dataset(9)
    loader = InMemoryLoader(images, labels, 4)
    assert loader.epoch == 0
    loader.sampler.set_epoch(3)
    assert epoch_indices(loader) == list(range(9))


@pytest.mark.parametrize("count", [20, 21, 23])
@pytest.mark.parametrize("shuffle", [False, True])
def test_ranks_take_disjoint_equal_shares(count, shuffle):
    images, labels = dataset(count)
    whole = InMemoryLoader(images, labels, 4, shuffle=shuffle, seed=1)
    whole.sampler.set_epoch(2)
    order = epoch_indices(whole)
    shares = []
    for rank in range(2):
        loader = InMemoryLoader(images, labels, 4, shuffle=shuffle, seed=1, rank=rank, world_size=2)
        loader.sampler.set_epoch(2)
        shares.append(epoch_indices(loader))
    assert len(shares[0]) == len(shares[1]) == count // 2
    assert not set(shares[0]) & set(shares[1])
    kept = 2 * (count // 2)
    assert set(shares[0]) | set(shares[1]) == set(order[:kept])  # all but the trimmed tail
    assert shares[0] == order[0:kept:2]  # interleaved shares of the same permutation
    assert shares[1] == order[1:kept:2]


def test_three_ranks_cover_the_dataset_minus_the_tail():
    images, labels = dataset(20)
    shares = [
        epoch_indices(InMemoryLoader(images, labels, 4, shuffle=True, rank=rank, world_size=3)) for rank in range(3)
    ]
    assert [len(share) for share in shares] == [6, 6, 6]
    assert len(set().union(*map(set, shares))) == 18


def augmented_epoch(seed: int, epoch: int, rank: int, world_size: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    images, labels = dataset(16)
    augmentation = Augmentation(translate=2, flip="random", cutout=2)
    loader = InMemoryLoader(
        images, labels, 4, shuffle=True, augmentation=augmentation, seed=seed, rank=rank, world_size=world_size
    )
    loader.sampler.set_epoch(epoch)
    return list(loader)


def same_batches(first: list, second: list) -> bool:
    return len(first) == len(second) and all(
        torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(first, second, strict=True)
    )


def test_augmentation_is_reproducible_for_seed_epoch_and_rank():
    reference = augmented_epoch(seed=0, epoch=1, rank=1)
    assert len(reference) == 2
    assert same_batches(reference, augmented_epoch(seed=0, epoch=1, rank=1))
    for seed, epoch, rank in ((1, 1, 1), (0, 2, 1), (0, 1, 0)):
        assert not same_batches(reference, augmented_epoch(seed, epoch, rank)), (seed, epoch, rank)


def test_augmentation_changes_images_but_not_labels():
    images, labels = dataset(16)
    augmentation = Augmentation(translate=2, flip="random")
    loader = InMemoryLoader(images, labels, 8, shuffle=True, augmentation=augmentation)
    changed = 0
    for batch, batch_labels in loader:
        assert batch.dtype == torch.uint8
        assert batch.shape == (8, 6, 6, 3)
        raw = images[batch_labels]
        changed += sum(not torch.equal(a, r) for a, r in zip(batch, raw, strict=True))
        for a, r in zip(batch, raw, strict=True):
            assert set(a.unique().tolist()) <= set(r.unique().tolist())
    assert changed > 8


def test_alternate_flip_parity_is_seeded_per_dataset_image():
    images, labels = dataset(64)
    loader = InMemoryLoader(images, labels, 16, seed=2)
    same = InMemoryLoader(images, labels, 16, seed=2)
    other = InMemoryLoader(images, labels, 16, seed=3)
    assert loader.flip_parity.shape == (64,)
    assert set(loader.flip_parity.tolist()) == {0, 1}
    assert torch.equal(loader.flip_parity, same.flip_parity)
    assert not torch.equal(loader.flip_parity, other.flip_parity)


def test_alternate_flip_through_the_loader_switches_with_the_epoch():
    images, labels = dataset(12)
    augmentation = Augmentation(translate=0, flip="alternate")
    loader = InMemoryLoader(images, labels, 4, augmentation=augmentation, seed=0)
    epochs = []
    for epoch in (0, 1):
        loader.sampler.set_epoch(epoch)
        epochs.append(torch.cat([b for b, _ in loader]))
    assert torch.equal(epochs[1], epochs[0].flip(2))
    for index in range(12):
        flipped = loader.flip_parity[index].item() % 2 == 1
        assert torch.equal(epochs[0][index], images[index].flip(1) if flipped else images[index])


def test_mismatched_lengths_raise():
    images, labels = dataset(5)
    with pytest.raises(ValueError, match="5 images but 4 labels"):
        InMemoryLoader(images, labels[:4], 2)
