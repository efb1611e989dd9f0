"""Fashion-MNIST (60,000 train + 10,000 test 28x28 grayscale images, 10 classes) read from its IDX files.

The files come from the Debian package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``) or
any folder named by ``SNZOO_FASHION_MNIST`` that holds ``{train,t10k}-{images-idx3,labels-idx1}-ubyte`` files,
gzip'd (``.gz``) or plain.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from snzoo.data.datasets import DataError, PathLike, Transform, _cause

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_ENV = "SNZOO_FASHION_MNIST"
# The data name that selects this set wherever a data path is asked for (`--data fashion-mnist`).
FASHION_MNIST = "fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# Per-pixel mean and standard deviation of the 60,000 training images after ToTensor (values in [0, 1]).
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)

_SPLIT_PREFIX = {"train": "train", "test": "t10k"}
_INSTALL_HINT = (f"install the Debian package dataset-fashion-mnist (apt-get install dataset-fashion-mnist) "
                 f"or set {FASHION_MNIST_ENV} to a folder holding the Fashion-MNIST IDX files")
# IDX type codes: https://yann.lecun.com/exdb/mnist/ ("THE IDX FILE FORMAT"); all values are big-endian.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_HINT = "expected a complete IDX file (gzip'd or plain), e.g. a fresh copy from dataset-fashion-mnist"
_GZIP_MAGIC = b"\x1f\x8b"

# Decoded arrays by (real path, size, mtime): each file is decompressed once per process, and a file that is
# replaced on disk is read again.
_CACHE: dict[tuple[str, int, int], np.ndarray] = {}


def _file_bytes(path: Path) -> bytes:
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
        if raw[:2] == _GZIP_MAGIC:
            # Detected from the content, not the name, so a plain file called .gz (or the reverse) still reads.
            return gzip.decompress(raw)
        return raw
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read IDX file {path}: {_cause(exc)}; {_IDX_HINT}") from exc


def _parse_idx(path: Path, data: bytes) -> np.ndarray:
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{path} is not an IDX file (bad magic number {data[:4].hex() or 'none'}); {_IDX_HINT}")
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        raise DataError(f"{path} has unknown IDX type code 0x{code:02x}; {_IDX_HINT}")
    if ndim == 0:
        raise DataError(f"{path} declares 0 dimensions; {_IDX_HINT}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path} is truncated inside its header ({len(data)} bytes); {_IDX_HINT}")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        state = "truncated" if len(data) < expected else "longer than its header says"
        raise DataError(f"{path} is {state}: {len(data)} bytes for shape {shape}, expected {expected}; {_IDX_HINT}")
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    # Multi-byte values are converted to native order once, so later arithmetic is not slowed by byte swaps.
    return array if dtype.itemsize == 1 else array.astype(dtype.newbyteorder("="))


def read_idx(path: PathLike) -> np.ndarray:
    """The array stored in an IDX file (gzip'd or plain), read-only and cached per process.

    The magic number, type code and dimensions are checked against the file's length; a missing, corrupt or
    truncated file raises ``DataError`` naming it.
    """
    path = Path(path)
    try:
        stat = path.stat()
    except OSError as exc:
        raise DataError(f"cannot read IDX file {path}: {_cause(exc)}; {_IDX_HINT}") from exc
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    array = _CACHE.get(key)
    if array is None:
        array = _parse_idx(path, _file_bytes(path))
        array.flags.writeable = False
        _CACHE[key] = array
    return array


def fashion_mnist_dir(root: PathLike | None = None) -> Path:
    """The Fashion-MNIST folder: ``root`` if given, else ``$SNZOO_FASHION_MNIST``, else the Debian package's."""
    if root is not None:
        return Path(root)
    env = os.environ.get(FASHION_MNIST_ENV)
    return Path(env) if env else FASHION_MNIST_DIR


def _split_file(folder: Path, split: str, kind: str) -> Path:
    name = f"{_SPLIT_PREFIX[split]}-{kind}-ubyte"
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    raise DataError(f"Fashion-MNIST {split} file {name}.gz not found in {folder}; {_INSTALL_HINT}")


class FashionMNIST(Dataset):
    """Fashion-MNIST ``split`` ("train" or "test"); items are ``(transform(image), label, index)``.

    ``image`` is a 28x28 PIL image of mode "L"; with ``transform=None`` it is returned as is, which is what
    ``SeededAugmentation`` expects. ``targets`` holds all labels as an int64 tensor.
    """

    num_classes: ClassVar[int] = len(FASHION_MNIST_CLASSES)
    classes: ClassVar[list[str]] = list(FASHION_MNIST_CLASSES)

    def __init__(self, split: str = "train", transform: Transform | None = None, root: PathLike | None = None) -> None:
        if split not in _SPLIT_PREFIX:
            raise DataError(f"unknown Fashion-MNIST split {split!r}; expected one of {', '.join(_SPLIT_PREFIX)}")
        self.split = split
        self.transform = transform
        self.root = fashion_mnist_dir(root)
        images_path = _split_file(self.root, split, "images-idx3")
        labels_path = _split_file(self.root, split, "labels-idx1")
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3 or images.dtype != np.uint8:
            raise DataError(f"{images_path} holds a {images.dtype} array of shape {images.shape}; "
                            "expected uint8 images of shape (count, height, width)")
        if labels.ndim != 1 or labels.dtype != np.uint8:
            raise DataError(f"{labels_path} holds a {labels.dtype} array of shape {labels.shape}; "
                            "expected uint8 labels of shape (count,)")
        if len(images) != len(labels):
            raise DataError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels; "
                            "expected one label per image")
        if len(labels) and int(labels.max()) >= self.num_classes:
            raise DataError(f"{labels_path} holds label {int(labels.max())}; expected 0 to {self.num_classes - 1}")
        self.images = images
        self.targets = torch.from_numpy(labels.astype(np.int64))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, int, int]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for Fashion-MNIST {self.split} ({len(self)} samples)")
        index = index % len(self)
        image = Image.fromarray(self.images[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index]), index
