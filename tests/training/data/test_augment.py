"""Batched augmentation: the gather-based shift+flip against an independent numpy reference, the
alternating flip, cutout and argument checks."""

import numpy as np
import pytest
import torch

from cifarlab.data.augment import Augmentation, cutout, translate_and_flip


def random_images(count: int, height: int = 7, width: int = 9, seed: int = 0) -> torch.Tensor:
    """Non-square on purpose, so that rows and columns cannot be confused."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, height, width, 3), dtype=torch.uint8, generator=generator)


def reference(images: np.ndarray, shift_y, shift_x, flip, pad: int) -> np.ndarray:
    """Reflect-pad each image, crop it at the shifted position, then mirror it: plain numpy, one at a time."""
    height, width = images.shape[1:3]
    out = []
    for image, dy, dx, mirror in zip(images, shift_y, shift_x, flip, strict=True):
        padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
        crop = padded[pad + dy : pad + dy + height, pad + dx : pad + dx + width]
        out.append(crop[:, ::-1] if mirror else crop)
    return np.stack(out)


def no_shift(count: int) -> torch.Tensor:
    return torch.zeros(count, dtype=torch.long)


def test_zero_shift_without_flip_is_identity():
    images = random_images(4)
    out = translate_and_flip(images, no_shift(4), no_shift(4), torch.zeros(4, dtype=torch.bool))
    assert torch.equal(out, images)


def test_shift_by_one_row_matches_reflect_padding():
    images = random_images(1)
    out = translate_and_flip(images, torch.tensor([1]), no_shift(1), torch.tensor([False]))
    # +1 row: output row i is input row i + 1; the last row reflects back to the second-to-last
    assert torch.equal(out[0, :-1], images[0, 1:])
    assert torch.equal(out[0, -1], images[0, -2])
    expected = reference(images.numpy(), [1], [0], [False], pad=1)
    assert np.array_equal(out.numpy(), expected)


def test_shift_by_minus_one_column_matches_reflect_padding():
    images = random_images(1)
    out = translate_and_flip(images, no_shift(1), torch.tensor([-1]), torch.tensor([False]))
    assert torch.equal(out[0, :, 1:], images[0, :, :-1])
    assert torch.equal(out[0, :, 0], images[0, :, 1])


def test_flip_mirrors_columns():
    images = random_images(3)
    out = translate_and_flip(images, no_shift(3), no_shift(3), torch.tensor([True, False, True]))
    assert torch.equal(out[0], images[0].flip(1))
    assert torch.equal(out[1], images[1])
    assert torch.equal(out[2], images[2].flip(1))
    assert torch.equal(out[0, :, 0], images[0, :, -1])


@pytest.mark.parametrize("pad", [1, 2, 4])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_shifts_and_flips_match_numpy_reference(pad, seed):
    generator = torch.Generator().manual_seed(seed)
    count = 16
    images = random_images(count, seed=seed)
    shift_y = torch.randint(-pad, pad + 1, (count,), generator=generator)
    shift_x = torch.randint(-pad, pad + 1, (count,), generator=generator)
    flip = torch.rand(count, generator=generator) < 0.5
    out = translate_and_flip(images, shift_y, shift_x, flip)
    expected = reference(images.numpy(), shift_y.tolist(), shift_x.tolist(), flip.tolist(), pad)
    assert np.array_equal(out.numpy(), expected)


def test_every_shift_and_flip_combination_matches_reference():
    pad = 2
    grid = [(dy, dx, f) for dy in range(-pad, pad + 1) for dx in range(-pad, pad + 1) for f in (False, True)]
    images = random_images(len(grid), seed=3)
    shift_y, shift_x, flip = (list(column) for column in zip(*grid, strict=True))
    out = translate_and_flip(images, torch.tensor(shift_y), torch.tensor(shift_x), torch.tensor(flip))
    assert np.array_equal(out.numpy(), reference(images.numpy(), shift_y, shift_x, flip, pad))


def test_augmentation_keeps_dtype_shape_and_values():
    images = random_images(8)
    augment = Augmentation(translate=2, flip="random")
    generator = torch.Generator().manual_seed(0)
    out = augment(images, torch.arange(8), epoch=0, flip_parity=torch.zeros(8, dtype=torch.long), generator=generator)
    assert out.dtype == torch.uint8
    assert out.shape == images.shape
    for before, after in zip(images, out, strict=True):
        assert set(after.unique().tolist()) <= set(before.unique().tolist())
    assert not torch.equal(out, images)


def test_augmentation_input_is_not_modified():
    images = random_images(4)
    copy = images.clone()
    augment = Augmentation(translate=2, flip="random", cutout=3)
    augment(images, torch.arange(4), 0, torch.zeros(4, dtype=torch.long), torch.Generator().manual_seed(0))
    assert torch.equal(images, copy)


def test_alternate_flip_switches_every_epoch():
    count = 12
    images = random_images(count)
    indices = torch.arange(count).flip(0)  # dataset positions, not batch positions
    parity = torch.randint(0, 2, (count,), generator=torch.Generator().manual_seed(5))
    augment = Augmentation(translate=0, flip="alternate")

    def run(epoch: int) -> torch.Tensor:
        return augment(images, indices, epoch, parity, torch.Generator().manual_seed(0))

    for epoch in range(4):
        now, following = run(epoch), run(epoch + 1)
        assert torch.equal(following, now.flip(2))  # opposite flips, image by image
        for position, index in enumerate(indices.tolist()):
            flipped = (parity[index].item() + epoch) % 2 == 1
            assert torch.equal(now[position], images[position].flip(1) if flipped else images[position])
    # both parities occur, so some images start flipped and others not
    assert 0 < int(parity.sum()) < count


def test_alternate_flip_with_translation_keeps_the_same_shifts():
    count = 6
    images = random_images(count)
    indices, parity = torch.arange(count), torch.zeros(count, dtype=torch.long)
    augment = Augmentation(translate=2, flip="alternate")
    even = augment(images, indices, 2, parity, torch.Generator().manual_seed(7))
    odd = augment(images, indices, 3, parity, torch.Generator().manual_seed(7))
    generator = torch.Generator().manual_seed(7)
    shift_y = torch.randint(-2, 3, (count,), generator=generator)
    shift_x = torch.randint(-2, 3, (count,), generator=generator)
    assert torch.equal(even, translate_and_flip(images, shift_y, shift_x, torch.zeros(count, dtype=torch.bool)))
    assert torch.equal(odd, translate_and_flip(images, shift_y, shift_x, torch.ones(count, dtype=torch.bool)))


def test_no_flip_and_no_translation_is_identity():
    images = random_images(5)
    augment = Augmentation(translate=0, flip="none")
    out = augment(images, torch.arange(5), 3, torch.ones(5, dtype=torch.long), torch.Generator().manual_seed(0))
    assert torch.equal(out, images)


def test_random_flip_flips_some_images_but_not_all():
    images = random_images(64)
    augment = Augmentation(translate=0, flip="random")
    out = augment(images, torch.arange(64), 0, torch.zeros(64, dtype=torch.long), torch.Generator().manual_seed(0))
    flipped = [torch.equal(o, i.flip(1)) for o, i in zip(out, images, strict=True)]
    kept = [torch.equal(o, i) for o, i in zip(out, images, strict=True)]
    assert all(f != k for f, k in zip(flipped, kept, strict=True))
    assert 10 < sum(flipped) < 54


# ---------------------------------------------------------------------------------------------------- cutout


def zero_region(image: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int, int] | None]:
    """The mask of zeroed pixels and the bounding box (top, bottom, left, right), bottom/right exclusive."""
    mask = (image == 0).all(-1)
    rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
    if len(rows) == 0:
        return mask, None
    return mask, (int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1)


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5])
def test_cutout_zeroes_one_clipped_square_per_image(size):
    height, width, count = 6, 8, 200
    generator = torch.Generator().manual_seed(size)
    images = torch.randint(1, 256, (count, height, width, 3), dtype=torch.uint8, generator=generator)  # no zeros
    out = cutout(images, size, torch.Generator().manual_seed(0))
    assert out.dtype == torch.uint8
    for before, after in zip(images, out, strict=True):
        mask, box = zero_region(after)
        assert box is not None, "no pixel was cut out"
        top, bottom, left, right = box
        # the zeroed pixels form one filled rectangle, all channels zero, everything else unchanged
        assert mask[top:bottom, left:right].all()
        assert int(mask.sum()) == (bottom - top) * (right - left)
        assert (after[mask] == 0).all()
        assert torch.equal(after[~mask], before[~mask])
        # it is the size x size square, clipped only where it meets the border
        assert bottom - top == size or top == 0 or bottom == height
        assert right - left == size or left == 0 or right == width
        assert bottom - top <= size
        assert right - left <= size


def test_cutout_square_overhangs_both_borders_alike():
    """The square's position is symmetric: what can be clipped at the top can be clipped at the bottom."""
    size, height, count = 3, 6, 400
    images = torch.full((count, height, height, 3), 9, dtype=torch.uint8)
    out = cutout(images, size, torch.Generator().manual_seed(0))
    at_top, at_bottom, at_left, at_right = set(), set(), set(), set()
    for image in out:
        _, box = zero_region(image)
        assert box is not None
        top, bottom, left, right = box
        if top == 0:
            at_top.add(bottom - top)
        if bottom == height:
            at_bottom.add(bottom - top)
        if left == 0:
            at_left.add(right - left)
        if right == height:
            at_right.add(right - left)
    assert at_top == at_bottom, f"clipped heights at the top {at_top} vs at the bottom {at_bottom}"
    assert at_left == at_right, f"clipped widths at the left {at_left} vs at the right {at_right}"


def test_cutout_is_reproducible_for_a_seed():
    images = random_images(8)
    first = cutout(images, 3, torch.Generator().manual_seed(4))
    second = cutout(images, 3, torch.Generator().manual_seed(4))
    other = cutout(images, 3, torch.Generator().manual_seed(5))
    assert torch.equal(first, second)
    assert not torch.equal(first, other)


def test_augmentation_applies_cutout_only_when_set():
    images = torch.randint(1, 256, (16, 8, 8, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    args = (torch.arange(16), 0, torch.zeros(16, dtype=torch.long))
    without = Augmentation(translate=0, flip="none", cutout=0)(images, *args, torch.Generator().manual_seed(0))
    assert not (without == 0).any()
    with_cutout = Augmentation(translate=0, flip="none", cutout=4)(images, *args, torch.Generator().manual_seed(0))
    assert all((image == 0).all(-1).any() for image in with_cutout)


# ------------------------------------------------------------------------------------------------ arguments


@pytest.mark.parametrize("flip", ["sometimes", "Random", "", "alternating"])
def test_invalid_flip_mode_raises(flip):
    with pytest.raises(ValueError, match="flip"):
        Augmentation(flip=flip)


@pytest.mark.parametrize("flip", ["random", "alternate", "none"])
def test_valid_flip_modes(flip):
    augment = Augmentation(flip=flip)
    assert augment.flip == flip
    assert augment.translate == 2
    assert augment.cutout == 0
