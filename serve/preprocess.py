"""Uploaded bytes -> the model's input: decode (Pillow), convert to RGB, resize to 32x32 if needed, stack.

Nothing else: scaling and normalisation live inside the ONNX graph (docs/model-contract.md). A bad image is an
InvalidImage (serve.errors maps it to a status).
"""

import io
import warnings
from collections.abc import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

SIZE = (32, 32)
# The one resampling filter for images that are not 32x32. Pillow's bilinear resize is antialiased (its
# support widens with the downscale factor), so large photos are averaged, not aliased.
RESAMPLE = Image.Resampling.BILINEAR
FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF")


class InvalidImage(Exception):
    """An upload that cannot become the model's input: not an image, truncated, a mode Pillow cannot convert."""


class EmptyImage(InvalidImage):
    """An upload of 0 bytes."""


class ImageTooLarge(InvalidImage):
    """An image with more pixels than the limit (a decompression bomb, or merely too big)."""


def limit_pillow(max_pixels: int) -> None:
    """Make Pillow's own decompression-bomb guard agree with ours, raising instead of warning.

    Process-wide (Pillow keeps it in module globals); decode_image checks the size itself as well.
    """
    Image.MAX_IMAGE_PIXELS = max_pixels
    warnings.simplefilter("error", Image.DecompressionBombWarning)


def decode_batch(blobs: Sequence[bytes], max_pixels: int) -> np.ndarray:
    """uint8 [N, 32, 32, 3] from N encoded images; an InvalidImage naming the first bad one."""
    return np.stack([decode_image(blob, max_pixels, index) for index, blob in enumerate(blobs)])


def decode_image(blob: bytes, max_pixels: int, index: int = 0) -> np.ndarray:
    if not blob:
        raise EmptyImage(f"image {index} is empty (0 bytes)")
    try:
        # Image.open reads only the header: the size is checked before any pixel is decoded.
        with Image.open(io.BytesIO(blob), formats=FORMATS) as image:
            if image.width * image.height > max_pixels:
                raise _too_many_pixels(index, f"{image.width}x{image.height}", max_pixels)
            # convert copies even an RGB image; animated formats: the first frame
            rgb = image if image.mode == "RGB" else image.convert("RGB")
            if rgb.size != SIZE:
                rgb = rgb.resize(SIZE, RESAMPLE)
            return np.asarray(rgb, dtype=np.uint8)  # inside the block: a closed image has no pixels
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise _too_many_pixels(index, str(error), max_pixels) from error
    except UnidentifiedImageError as error:
        raise InvalidImage(f"image {index} is not an image in a supported format {FORMATS}") from error
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        # truncated files, corrupt headers, modes Pillow cannot convert
        raise InvalidImage(f"image {index} cannot be decoded: {error}") from error


def _too_many_pixels(index: int, what: str, max_pixels: int) -> ImageTooLarge:
    return ImageTooLarge(f"image {index} is too large ({what}); at most {max_pixels} pixels")
