"""Image input for classification: PNG/JPEG and raw arrays → model input, typed 4xx errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from edgemesh.errors import EmptyImageError, ImageError, ImageSizeError, ImageTooLargeError, NotAnImageError
from edgemesh.vit.images import ImageLimits, decode_array, decode_batch, decode_image
from edgemesh.vit.model import ViTConfig

pytestmark = pytest.mark.unit

CFG = ViTConfig.uniform(image_size=28, patch_size=7, in_chans=1, num_classes=10, dim=16, depth=1, heads=1,
                        mean=0.13, std=0.31)


def _encode(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def test_png_of_the_model_size_decodes_to_normalised_pixels() -> None:
    arr = (np.arange(28 * 28) % 256).astype(np.uint8).reshape(28, 28)
    x = decode_image(_encode(arr, "PNG"), CFG, resize=False)
    assert x.shape == (1, 1, 28, 28)
    expected = (torch.from_numpy(arr.astype(np.float32) / 255.0) - 0.13) / 0.31
    assert torch.allclose(x[0, 0], expected, atol=1e-6)


def test_jpeg_and_rgb_are_resized_and_greyscaled() -> None:
    rgb = np.zeros((56, 40, 3), dtype=np.uint8)
    rgb[:, :20] = 255
    x = decode_image(_encode(rgb, "JPEG"), CFG)
    assert x.shape == (1, 1, 28, 28)
    assert x[0, 0, :, :5].mean() > x[0, 0, :, -5:].mean()  # the white half stays on the left
    inv = decode_image(_encode(rgb, "JPEG"), CFG, invert=True)
    assert inv[0, 0, :, :5].mean() < inv[0, 0, :, -5:].mean()


def test_wrong_size_without_resize_is_422() -> None:
    with pytest.raises(ImageSizeError) as e:
        decode_image(_encode(np.zeros((32, 32), np.uint8), "PNG"), CFG, resize=False)
    assert e.value.http_status == 422 and "28×28" in str(e.value)


def test_empty_not_an_image_truncated_and_other_formats_are_refused() -> None:
    with pytest.raises(EmptyImageError) as e:
        decode_image(b"", CFG)
    assert e.value.http_status == 400
    with pytest.raises(NotAnImageError) as e2:
        decode_image(b"hello, this is text and not a picture", CFG)
    assert e2.value.http_status == 415
    png = _encode(np.zeros((28, 28), np.uint8), "PNG")
    with pytest.raises(NotAnImageError):
        decode_image(png[: len(png) // 2], CFG)
    buf = io.BytesIO()
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(buf, format="BMP")
    with pytest.raises(NotAnImageError):
        decode_image(buf.getvalue(), CFG)


def test_too_many_bytes_or_pixels_is_413_before_decoding() -> None:
    png = _encode(np.zeros((64, 64), np.uint8), "PNG")
    with pytest.raises(ImageTooLargeError) as e:
        decode_image(png, CFG, limits=ImageLimits(max_bytes=len(png) - 1))
    assert e.value.http_status == 413
    with pytest.raises(ImageTooLargeError, match="pixels"):
        decode_image(png, CFG, limits=ImageLimits(max_pixels=64 * 64 - 1))
    # A small file claiming a huge canvas (decompression bomb): refused from its header alone.
    bomb = _encode(np.zeros((3000, 3000), np.uint8), "PNG")
    assert len(bomb) < 100_000
    with pytest.raises(ImageTooLargeError):
        decode_image(bomb, CFG, limits=ImageLimits(max_pixels=1_000_000))


def test_raw_arrays_single_batch_uint8_and_float() -> None:
    one = decode_array(np.full((28, 28), 255, np.uint8), CFG)
    assert one.shape == (1, 1, 28, 28)
    assert torch.allclose(one, torch.full_like(one, (1.0 - 0.13) / 0.31))
    batch = decode_array(np.zeros((3, 28, 28), np.float32).tolist(), CFG)
    assert batch.shape == (3, 1, 28, 28)
    assert decode_array(np.zeros((2, 1, 28, 28)), CFG).shape == (2, 1, 28, 28)


@pytest.mark.parametrize("bad, err", [
    (np.zeros((27, 28)), ImageSizeError),
    (np.zeros((2, 3, 28, 28)), ImageSizeError),
    (np.zeros((28,)), ImageSizeError),
    (np.zeros((0, 28, 28)), EmptyImageError),
    ([[1, 2], [3]], NotAnImageError),
    (np.array([["a"] * 28] * 28), NotAnImageError),
    (np.full((28, 28), 1.5), ImageError),
    (np.full((28, 28), np.nan), ImageError),
    (np.full((28, 28), 300), ImageError),
])
def test_bad_arrays_raise_typed_errors(bad: object, err: type[Exception]) -> None:
    with pytest.raises(err) as e:
        decode_array(bad, CFG)
    assert 400 <= e.value.http_status < 500  # type: ignore[attr-defined]


def test_batches_name_the_bad_image_and_respect_the_limit() -> None:
    good = _encode(np.zeros((28, 28), np.uint8), "PNG")
    assert decode_batch([good, good], CFG).shape == (2, 1, 28, 28)
    with pytest.raises(NotAnImageError, match="image 1"):
        decode_batch([good, b"junk"], CFG)
    with pytest.raises(EmptyImageError):
        decode_batch([], CFG)
    with pytest.raises(ImageTooLargeError):
        decode_batch([good] * 3, CFG, limits=ImageLimits(max_batch=2))
    with pytest.raises(ImageTooLargeError):
        decode_array(np.zeros((3, 28, 28)), CFG, limits=ImageLimits(max_batch=2))
