"""Turning user input (PNG/JPEG bytes or raw pixel arrays) into a ViT's input batch.

For ``POST /v1/classify`` and ``edgemesh classify IMAGE…``: every way an input can be unusable
raises a typed ``ImageError`` whose ``http_status`` is the 4xx to answer with (empty 400, not an
image 415, too large 413, wrong shape 422). Limits are checked before decoding the pixels, so a
small file that claims to be huge (a decompression bomb) is refused without allocating it.

Output: float32 (B, C, H, W), normalised like the model's training data; pixels are taken as
[0, 1] floats or 0..255 integers.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from edgemesh.errors import EmptyImageError, ImageError, ImageSizeError, ImageTooLargeError, NotAnImageError
from edgemesh.vit.model import ViTConfig
from edgemesh.vit.train import normalize

FORMATS = ("PNG", "JPEG")


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 8 << 20  # one encoded image
    max_pixels: int = 4096 * 4096  # width × height of one decoded image, before resizing
    max_batch: int = 256


def decode_image(data: bytes, config: ViTConfig, *, resize: bool = True, invert: bool = False,
                 limits: ImageLimits = ImageLimits()) -> torch.Tensor:
    """One PNG/JPEG → (1, C, H, W). ``resize=False`` refuses images not already the model's size;
    ``invert`` turns dark-on-light (a photo of paper) into the light-on-dark of MNIST-like data."""
    if not data:
        raise EmptyImageError("empty image: no bytes received")
    if len(data) > limits.max_bytes:
        raise ImageTooLargeError(f"image is {len(data):,} bytes; the limit is {limits.max_bytes:,}")
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=list(FORMATS))  # reads the header only
            w, h = img.size
            if w * h > limits.max_pixels:
                raise ImageTooLargeError(f"image is {w}×{h} pixels; the limit is {limits.max_pixels:,} pixels")
            if w == 0 or h == 0:
                raise EmptyImageError("image has no pixels")
            img = img.convert("L" if config.in_chans == 1 else "RGB")  # decodes the pixels
    except ImageError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise NotAnImageError(f"not a {'/'.join(FORMATS)} image ({exc.__class__.__name__})") from None
    except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt files
        raise NotAnImageError(f"unreadable image: {exc}") from None
    size = config.image_size
    if img.size != (size, size):
        if not resize:
            raise ImageSizeError(f"image is {img.size[0]}×{img.size[1]}; this model takes {size}×{size}")
        img = img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    x = torch.from_numpy(arr.copy())
    x = x.unsqueeze(0) if config.in_chans == 1 else x.permute(2, 0, 1)
    if invert:
        x = 1.0 - x
    return normalize(x.unsqueeze(0), config)


def decode_array(array: object, config: ViTConfig, *, limits: ImageLimits = ImageLimits()) -> torch.Tensor:
    """Raw pixels (nested lists or an ndarray) → (B, C, H, W). Shapes: (H, W) one image;
    (B, H, W) a batch of one-channel images (or (C, H, W) for a multi-channel model);
    (B, C, H, W). Integers are 0..255, floats [0, 1]. The size must match the model exactly."""
    try:
        a = np.asarray(array)
    except (ValueError, TypeError) as exc:  # ragged nested lists
        raise NotAnImageError(f"not a pixel array: {exc}") from None
    if a.size == 0:
        raise EmptyImageError("empty array: no pixels")
    if a.dtype.kind not in "uif" and a.dtype != np.bool_:
        raise NotAnImageError(f"pixel array of {a.dtype} values; expected numbers")
    if a.size > limits.max_pixels * max(1, config.in_chans) * 4:
        raise ImageTooLargeError(f"array has {a.size:,} values; too large")
    c, s = config.in_chans, config.image_size
    if a.ndim == 2:
        a = a[None, None]
    elif a.ndim == 3:
        a = a[:, None] if c == 1 else a[None]
    elif a.ndim != 4:
        raise ImageSizeError(f"pixel array with {a.ndim} dimensions; expected (H, W), (B, H, W) or (B, C, H, W)")
    if a.shape[1:] != (c, s, s):
        raise ImageSizeError(f"pixel array of shape {tuple(a.shape)}; this model takes (B, {c}, {s}, {s})")
    if a.shape[0] > limits.max_batch:
        raise ImageTooLargeError(f"batch of {a.shape[0]} images; the limit is {limits.max_batch}")
    if a.dtype.kind == "f":
        if not np.isfinite(a).all():
            raise ImageError("pixel array holds NaN or infinite values")
        if a.min() < 0.0 or a.max() > 1.0:
            raise ImageError("float pixels must be in [0, 1] (or send 0..255 integers)")
        x = torch.from_numpy(a.astype(np.float32))
    else:
        if a.min() < 0 or a.max() > 255:
            raise ImageError("integer pixels must be in 0..255")
        x = torch.from_numpy(a.astype(np.float32) / 255.0)
    return normalize(x, config)


def decode_batch(items: list[bytes], config: ViTConfig, *, resize: bool = True, invert: bool = False,
                 limits: ImageLimits = ImageLimits()) -> torch.Tensor:
    """Several encoded images → one batch (the first bad one raises, naming its index)."""
    if not items:
        raise EmptyImageError("no images in the request")
    if len(items) > limits.max_batch:
        raise ImageTooLargeError(f"batch of {len(items)} images; the limit is {limits.max_batch}")
    out = []
    for i, data in enumerate(items):
        try:
            out.append(decode_image(data, config, resize=resize, invert=invert, limits=limits))
        except ImageError as exc:
            raise type(exc)(f"image {i}: {exc}") from None
    return torch.cat(out)
