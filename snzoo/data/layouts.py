"""One entry point for ImageNet val in any layout users hold it in, detected from what ``data`` points at.

Layouts: class folders (``ROOT/<wnid>/*.JPEG``) and list files (through ``build_eval_dataset``), Hugging Face
datasets (a ``save_to_disk`` folder, parquet shards, or ``hfds:ORG/NAME`` for a Hub id), webdataset tar shards
(``wds:`` or a ``.tar`` pattern), and the official ``ILSVRC2012_img_val.tar`` or its flat folder of
``ILSVRC2012_val_*.JPEG`` with the devkit (``archive:``, or detected). A prefix forces the layout. Every layout
yields ``(transform(image), label, index)`` with the models' class indices (sorted WordNet-id order).
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path
from typing import Optional

from torch.utils.data import Dataset

from snzoo._io import PathLike
from snzoo.data.datasets import Transform, build_eval_dataset
from snzoo.data.encoded import imagenet_classes
from snzoo.data.hf_datasets import HFImageDataset, is_saved_dataset, parquet_files
from snzoo.data.ilsvrc_devkit import VAL_NAME
from snzoo.data.ilsvrc_val import VAL_TAR, ILSVRCValArchive, ILSVRCValFolder, is_val_folder
from snzoo.data.wds_shards import WebDatasetShards
from snzoo.errors import DataError

PREFIXES = ("hfds:", "wds:", "archive:")
LAYOUTS = ("class folders ROOT/<wnid>/*.JPEG", "a .txt list file", "a datasets save_to_disk folder",
           "parquet shards (a folder or *.parquet)", "hfds:ORG/NAME (a Hub dataset id)",
           "webdataset .tar shards (wds:, a folder or val-{0000..0063}.tar)",
           f"{VAL_TAR} or a folder of ILSVRC2012_val_*.JPEG with the devkit beside it or devkit=")


def _unknown(data: str, why: str) -> DataError:
    return DataError(f"evaluation data {data} {why}; expected one of: {'; '.join(LAYOUTS)}")


def _is_official_tar(path: Path) -> bool:
    if path.name == VAL_TAR:
        return True
    # A renamed val tar is told from a webdataset shard by its first members: flat val names, no .cls.
    try:
        with tarfile.open(path, "r:") as tar:
            names = [os.path.basename(m.name) for _, m in zip(range(8), tar)]
    except (tarfile.TarError, OSError):
        return False
    return bool(names) and all(VAL_NAME.match(n) for n in names)


def detect_layout(data: PathLike) -> str:
    """The layout `data` is in: "folders" (class folders or a list file), "hfds", "wds" or "archive";
    DataError when it is none of them."""
    data = os.fspath(data)
    prefix = next((p for p in PREFIXES if data.startswith(p)), None)
    if prefix:
        return prefix[:-1]
    path = Path(data)
    if "{" in data or any(c in data for c in "*?["):
        if data.endswith(".parquet"):
            return "hfds"
        if data.endswith(".tar"):
            return "wds"
        raise _unknown(data, "is a pattern of neither .tar shards nor .parquet files")
    if not path.exists():
        raise _unknown(data, "does not exist (a Hub dataset id needs the hfds: prefix)")
    if path.is_file():
        if path.suffix == ".parquet":
            return "hfds"
        if path.suffix == ".tar":
            return "archive" if _is_official_tar(path) else "wds"
        if path.suffix.lower() == ".txt":
            return "folders"
        raise _unknown(data, "is a file of no known layout")
    if is_saved_dataset(path) or parquet_files(path, "validation"):
        return "hfds"
    if (path / VAL_TAR).is_file() or is_val_folder(path):
        return "archive"
    entries = [e for e in os.scandir(path) if not e.name.startswith(".")]
    if any(e.is_file() and e.name.endswith(".tar") for e in entries):
        return "wds"
    if any(e.is_dir() for e in entries):
        return "folders"
    raise _unknown(data, "is a folder of no known layout")


def _official(data: str, transform: Transform | None, devkit: Optional[PathLike], skip_bad: bool,
              decoder: str) -> Dataset:
    path = Path(data)
    if path.is_dir() and (path / VAL_TAR).is_file():
        path = path / VAL_TAR
    if path.is_dir():
        return ILSVRCValFolder(path, transform, devkit=devkit, skip_bad=skip_bad, decoder=decoder)
    return ILSVRCValArchive(path, transform, devkit=devkit, skip_bad=skip_bad, decoder=decoder)


def open_imagenet_val(data: PathLike, transform: Transform | None, *, split: Optional[str] = None,
                      image_column: Optional[str] = None, label_column: Optional[str] = None,
                      devkit: Optional[PathLike] = None, root: Optional[PathLike] = None,
                      skip_bad: bool = False, decoder: str = "pil") -> Dataset:
    """ImageNet val from ``data`` in whichever layout it is (see the module docstring), as an evaluation dataset.

    ``split``, ``image_column`` and ``label_column`` apply to Hugging Face datasets (default split
    "validation", columns found by name); ``devkit`` is the ILSVRC2012 devkit for the official layout when it
    does not lie beside the images; ``root`` is where a list file's paths start; ``decoder`` is "pil" or
    "torchvision" (``snzoo.data.decoders``). Labels are the models' class
    indices, checked: a layout whose labels cannot be mapped to them raises ``DataError``.
    """
    text = os.fspath(data)
    prefix = next((p for p in PREFIXES if text.startswith(p)), None)
    layout = detect_layout(text)
    target = text[len(prefix):] if prefix else text
    hf_options = {"split": split, "image_column": image_column, "label_column": label_column}
    if layout != "hfds" and any(v is not None for v in hf_options.values()):
        given = next(k for k, v in hf_options.items() if v is not None)
        raise DataError(f"{given} only applies to Hugging Face datasets, but {text} is read as {layout}; "
                        "expected no split or column options for this layout")
    if devkit is not None and layout != "archive":
        raise DataError(f"devkit only applies to the official ImageNet val layout, but {text} is read as {layout}; "
                        f"expected {VAL_TAR} or a folder of ILSVRC2012_val_*.JPEG")
    if layout == "hfds":
        return HFImageDataset(target, transform, split=split or "validation", image_column=image_column,
                              label_column=label_column, skip_bad=skip_bad, decoder=decoder)
    if layout == "wds":
        return WebDatasetShards(target, transform, skip_bad=skip_bad, decoder=decoder)
    if layout == "archive":
        return _official(target, transform, devkit, skip_bad, decoder)
    return build_eval_dataset(target, transform, root=root, class_names=imagenet_classes(), skip_bad=skip_bad,
                              decoder=decoder)
