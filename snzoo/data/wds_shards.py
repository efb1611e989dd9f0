"""ImageNet val as webdataset tar shards (timm's ``imagenet1k-validation-{0000..0063}.tar``), read in place.

A sample is the group of members sharing a key (``KEY.jpg``, ``KEY.cls``, ``KEY.json``): the image (jpg,
jpeg, png or webp), the class index as text (sorted WordNet-id order, as timm writes it; a WordNet id is also
accepted) and optionally JSON metadata whose ``filename`` is the original file name. Shards are indexed by
one pass over their member headers; images are then read by offset, so nothing is unpacked.
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path
from typing import BinaryIO

from snzoo._io import PathLike
from snzoo.data.datasets import Transform
from snzoo.data.encoded import (
    WNID_FORM,
    EncodedImageDataset,
    TarMember,
    check_label,
    read_member,
    require,
    scan_tar,
    wnid_label,
)
from snzoo.errors import DataError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_EXPECTED = "expected webdataset shards: a .tar file, a folder of .tar files or a pattern like val-{0000..0063}.tar"


def expand_shards(spec: PathLike) -> list[str]:
    """The shard files of a brace pattern, glob, single .tar or folder of .tar files, in reading order."""
    text = os.fspath(spec)
    if os.path.isdir(text):
        shards = sorted(str(p) for p in Path(text).iterdir() if p.name.endswith(".tar") and not p.name.startswith("."))
        if not shards:
            raise DataError(f"{text} holds no .tar shards; {_EXPECTED}")
        return shards
    if "{" in text:
        braceexpand = require("braceexpand", "webdataset shard patterns")
        shards = list(braceexpand.braceexpand(text))
    elif any(c in text for c in "*?["):
        shards = sorted(glob.glob(text))
    else:
        shards = [text]
    missing = [s for s in shards if not os.path.isfile(s)]
    if not shards or missing:
        first = missing[0] if missing else text
        raise DataError(f"shard {first} does not exist ({len(missing) or 1} of {len(shards)} missing); {_EXPECTED}")
    return shards


def _key_and_ext(name: str) -> tuple[str, str]:
    # webdataset's rule: the key ends at the first dot of the base name, so "a/b.c.jpg" is key "a/b", ext "c.jpg".
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _group(members: list[TarMember]) -> list[tuple[str, dict[str, TarMember]]]:
    groups: dict[str, dict[str, TarMember]] = {}
    for member in members:
        key, ext = _key_and_ext(member.name)
        groups.setdefault(key, {})[ext] = member
    return list(groups.items())


def _label(cls_member: TarMember, handle: BinaryIO, where: str) -> int:
    text = read_member(cls_member, handle).decode("utf-8", "replace").strip()
    if WNID_FORM.match(text):
        return wnid_label(text, where)
    try:
        value = int(text)
    except ValueError:
        raise DataError(f"{where}: class {text!r} is not a class index; expected the index as text, "
                        "e.g. '281'") from None
    return check_label(value, where)


def _file_name(parts: dict[str, TarMember], handle: BinaryIO, key: str, image_ext: str) -> str:
    if "json" in parts:
        try:
            meta = json.loads(read_member(parts["json"], handle))
        except ValueError:
            meta = None
        if isinstance(meta, dict) and isinstance(meta.get("filename"), str):
            return os.path.basename(meta["filename"])
    base = key.rpartition("/")[2]
    # ImageNet's own files are all .JPEG, whatever extension the shard writer gave the member.
    return f"{base}.JPEG" if base.startswith("ILSVRC2012_") else f"{base}.{image_ext}"


class WebDatasetShards(EncodedImageDataset):
    """The samples of webdataset tar shards in shard and member order; labels are ImageNet class indices."""

    def __init__(self, shards: PathLike, transform: Transform | None, skip_bad: bool = False,
                 decoder: str = "pil") -> None:
        super().__init__(transform, skip_bad, decoder)
        self.shards = expand_shards(shards)
        self.samples, self.file_names, self._images = [], [], []
        for shard in self.shards:
            self._add_shard(shard)
        if not self.samples:
            raise DataError(f"no samples in {os.fspath(shards)}; expected members KEY.jpg with KEY.cls "
                            "(the class index) in each shard")

    def _add_shard(self, shard: str) -> None:
        groups = _group(scan_tar(shard))
        with open(shard, "rb") as handle:
            for key, parts in groups:
                self._add_sample(shard, key, parts, handle)

    def _add_sample(self, shard: str, key: str, parts: dict[str, TarMember], handle: BinaryIO) -> None:
        where = f"{shard}:{key}"
        image_ext = next((ext for ext in IMAGE_EXTS if ext in parts), None)
        if image_ext is None and "cls" not in parts:
            return  # metadata-only entries (e.g. a shard's __meta__.json) are not samples
        if image_ext is None or "cls" not in parts:
            missing = "an image (jpg, jpeg, png or webp)" if image_ext is None else "a .cls class index"
            raise DataError(f"sample {where} has no {missing}; members: {', '.join(sorted(parts))}; "
                            "expected KEY.jpg and KEY.cls per sample")
        self.samples.append((f"{where}.{image_ext}", _label(parts["cls"], handle, where)))
        self.file_names.append(_file_name(parts, handle, key, image_ext))
        self._images.append(parts[image_ext])

    def _read(self, index: int) -> bytes:
        return read_member(self._images[index])
