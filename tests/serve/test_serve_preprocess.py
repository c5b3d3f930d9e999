"""Preprocessing: decode, convert to RGB, resize with the documented filter; every bad upload a clear 4xx."""

import io

import numpy as np
import pytest
from PIL import Image

from serve.errors import ApiError, as_api_error
from serve.preprocess import RESAMPLE, InvalidImage, decode_batch, decode_image

LIMIT = 1024 * 1024


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def pattern(size: tuple[int, int] = (32, 32)) -> Image.Image:
    values = np.random.default_rng(0).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(values, "RGB")


def test_rgb_32x32_png_decodes_to_its_exact_pixels():
    image = pattern()
    decoded = decode_image(encode(image), LIMIT)
    assert decoded.dtype == np.uint8 and decoded.shape == (32, 32, 3)
    np.testing.assert_array_equal(decoded, np.asarray(image))


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "I;16", "1"])
def test_every_common_mode_becomes_rgb_as_pillow_converts_it(mode):
    image = pattern().convert(mode) if mode != "I;16" else Image.fromarray(np.full((32, 32), 300, np.uint16))
    fmt = "JPEG" if mode == "CMYK" else "TIFF" if mode == "I;16" else "PNG"
    blob = encode(image, fmt)
    decoded = decode_image(blob, LIMIT)
    assert decoded.shape == (32, 32, 3)
    np.testing.assert_array_equal(decoded, np.asarray(Image.open(io.BytesIO(blob)).convert("RGB")))


def test_other_sizes_are_resized_with_the_documented_filter():
    image = pattern((97, 61))
    decoded = decode_image(encode(image), LIMIT)
    np.testing.assert_array_equal(decoded, np.asarray(image.resize((32, 32), RESAMPLE)))
    assert RESAMPLE == Image.Resampling.BILINEAR  # the filter docs/serving.md and the OpenAPI description name


def test_animated_gif_uses_its_first_frame():
    frames = [Image.new("RGB", (32, 32), color) for color in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    decoded = decode_image(buffer.getvalue(), LIMIT)
    assert tuple(decoded[0, 0]) == (255, 0, 0)


def test_batch_stacks_images_in_order():
    images = [pattern(), Image.new("RGB", (32, 32), (1, 2, 3))]
    batch = decode_batch([encode(i) for i in images], LIMIT)
    assert batch.shape == (2, 32, 32, 3)
    assert tuple(batch[1, 5, 5]) == (1, 2, 3)


def refusal(blob: bytes, limit: int = LIMIT, index: int = 0) -> ApiError:
    """The InvalidImage decoding raises, as the API answers it."""
    with pytest.raises(InvalidImage) as caught:
        decode_batch([encode(pattern())] * index + [blob], limit)
    return as_api_error(caught.value)


def test_empty_file_is_refused():
    error = refusal(b"")
    assert (error.status, error.code) == (422, "empty_image")


def test_bytes_that_are_no_image_are_refused_naming_the_image():
    error = refusal(b"%PDF-1.4 definitely not an image", index=2)
    assert (error.status, error.code) == (422, "invalid_image") and "image 2" in error.message


def test_truncated_file_is_refused():
    blob = encode(pattern((64, 64)), "JPEG")
    error = refusal(blob[: len(blob) // 2])
    assert (error.status, error.code) == (422, "invalid_image")


def test_decompression_bomb_is_refused_before_decoding():
    # 4,000 x 4,000 of one colour: a few kB of PNG, 48 MB once decoded
    blob = encode(Image.new("L", (4000, 4000)))
    assert len(blob) < 100_000
    error = refusal(blob)
    assert (error.status, error.code) == (413, "image_too_large") and "4000x4000" in error.message


def test_images_within_the_pixel_limit_are_accepted():
    assert decode_image(encode(Image.new("RGB", (1024, 1024))), LIMIT).shape == (32, 32, 3)
