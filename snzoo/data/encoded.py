"""What every ImageNet val layout reader shares: the model's class list, decoding image bytes, tar member access.

Readers for packed layouts (parquet rows, tar shards, the official archive) subclass ``EncodedImageDataset``:
they list their samples once at construction as ``(where, label)`` pairs (``where`` names the shard and
member, or row, for error messages and ``Skipped`` records) and fetch a sample's encoded bytes on demand, so
nothing is unpacked to disk. Items are exactly ``EvalDataset``'s: ``(transform(image), label, index)``, or a
``Skipped`` record with ``skip_bad``.
"""

from __future__ import annotations

import importlib
import io
import os
import re
import tarfile
from functools import lru_cache
from importlib import resources
from typing import Any, BinaryIO, NamedTuple, Optional

from PIL import Image

from snzoo.data.datasets import EvalDataset, Transform, _cause, _to_rgb
from snzoo.data.decoders import Decoded, decode_with
from snzoo.errors import BadImageError, DataError

DATA_EXTRA = "pip install snzoo[data]"
WNID_FORM = re.compile(r"^n\d{8}$")


@lru_cache(maxsize=1)
def imagenet_classes() -> tuple[str, ...]:
    """The 1000 ImageNet-1k WordNet ids in the models' class-index order (sorted)."""
    return tuple((resources.files("snzoo.data") / "imagenet1k_wnids.txt").read_text().split())


@lru_cache(maxsize=1)
def _wnid_index() -> dict[str, int]:
    return {wnid: i for i, wnid in enumerate(imagenet_classes())}


def wnid_label(wnid: str, where: str) -> int:
    """The model's class index of a WordNet id; an id that is not an ImageNet-1k class is a ``DataError``."""
    label = _wnid_index().get(wnid.strip())
    if label is None:
        raise DataError(f"{where}: class {wnid.strip()!r} is not one of the 1000 ImageNet-1k WordNet ids; "
                        "expected ids such as 'n01440764'")
    return label


def check_label(label: Any, where: str) -> int:
    """A class index as the model numbers them (0-999), or a ``DataError`` naming the sample."""
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(imagenet_classes()):
        hint = "; the split has no labels (ImageNet's test split uses -1)" if label == -1 else ""
        raise DataError(f"{where}: label {label!r} is not an ImageNet-1k class index{hint}; expected 0 to 999 "
                        "in sorted WordNet-id order")
    return label


def require(module: str, what: str) -> Any:
    """Import an optional package of the ``data`` extra, or stop with the line that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(f"reading {what} needs the Python package {module!r}, which is not installed; "
                        f"run: {DATA_EXTRA}") from None


def decode_rgb(data: bytes, where: str) -> Image.Image:
    """Decode encoded image bytes fully to 8-bit RGB, as ``load_rgb`` does for files; errors name ``where``."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return _to_rgb(image)
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise BadImageError(f"cannot read image {where}: {_cause(exc)}; "
                            "expected a complete, readable image") from exc


class EncodedImageDataset(EvalDataset):
    """Samples held as encoded bytes in a container; subclasses fill ``samples``, ``file_names`` and ``_read``."""

    samples: list[tuple[str, int]]
    file_names: list[str]

    def __init__(self, transform: Transform | None, skip_bad: bool, decoder: str = "pil") -> None:
        super().__init__(transform, skip_bad, decoder)
        self.classes = list(imagenet_classes())
        self.num_classes = len(self.classes)

    def file_name(self, index: int) -> str:
        """The image's file name, e.g. ``ILSVRC2012_val_00000001.JPEG``."""
        return self.file_names[index]

    def _read(self, index: int) -> bytes:
        raise NotImplementedError

    def _decode(self, index: int) -> Decoded:
        data = self._read(index)
        return decode_with(self.decoder, data, lambda: decode_rgb(data, self.samples[index][0]))


class TarMember(NamedTuple):
    """Where a member's bytes lie in an uncompressed tar file, so it can be read with one seek."""

    tar: str
    name: str
    offset: int
    size: int


def scan_tar(path: str) -> list[TarMember]:
    """The regular-file members of an uncompressed tar, in archive order, from one pass over its headers."""
    try:
        with tarfile.open(path, "r:") as tar:
            return [TarMember(path, m.name, m.offset_data, m.size) for m in tar if m.isfile()]
    except tarfile.ReadError as exc:
        # Compressed tars cannot be read by offset; the published shards and archive are plain tars.
        raise DataError(f"cannot read {path} as an uncompressed tar file: {_cause(exc)}; "
                        "expected a plain .tar (decompress .tar.gz shards first)") from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {_cause(exc)}; expected a readable .tar file") from None


def read_member(member: TarMember, handle: Optional[BinaryIO] = None) -> bytes:
    """The bytes of one tar member, through ``handle`` (the tar file open for reading) when given."""
    if handle is None:
        with open(member.tar, "rb") as f:
            return read_member(member, f)
    handle.seek(member.offset)
    return handle.read(member.size)


def sample_file_name(dataset: Any, index: int) -> str:
    """The image file name of sample ``index`` of any evaluation dataset (a layout reader, image folder or list)."""
    if hasattr(dataset, "file_name"):
        return dataset.file_name(index)
    return os.path.basename(dataset.samples[index][0])
