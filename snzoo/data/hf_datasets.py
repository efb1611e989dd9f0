"""ImageNet val from Hugging Face ``datasets``: a ``save_to_disk`` folder, parquet shards, or a Hub dataset id.

Images are read as the stored encoded bytes (the Image feature with ``decode=False``) and decoded like files,
so a parquet copy of val gives the same tensors as the JPEGs. Labels must end up as the models' class indices
(sorted WordNet-id order): a ClassLabel whose names are WordNet ids is mapped by name; a 1000-name ClassLabel
(ILSVRC/imagenet-1k, whose labels already follow the sorted order) or plain integers are taken as indices and
range-checked; string WordNet ids are mapped by name. Anything else stops with a ``DataError``.
"""

from __future__ import annotations

import contextlib
import glob
import os
from pathlib import Path
from typing import Any, Iterator, Optional

from snzoo._io import PathLike, env_flag, first_line
from snzoo.data.datasets import Transform
from snzoo.data.encoded import WNID_FORM, EncodedImageDataset, check_label, imagenet_classes, require, wnid_label
from snzoo.errors import DataError

IMAGE_COLUMNS = ("image", "img", "jpg")
LABEL_COLUMNS = ("label", "labels", "cls")
NAME_COLUMNS = ("file_name", "filename", "__key__")
_WHAT = "Hugging Face datasets"


def is_saved_dataset(path: Path) -> bool:
    """Whether ``path`` is a ``save_to_disk`` folder (one dataset or a dict of splits)."""
    return path.is_dir() and any((path / n).is_file() for n in ("dataset_info.json", "state.json", "dataset_dict.json"))


def parquet_files(path: PathLike, split: str) -> list[str]:
    """The parquet shards of ``split`` in a folder or its ``data/``, or matching a glob, in name order.

    Hub-style names (``validation-00000-of-00014.parquet``) select the split; otherwise every shard is read.
    """
    text = os.fspath(path)
    if os.path.isdir(text):
        # Only where Hub repositories put them: a walk of a whole tree (a class-folder train set) would take minutes.
        files = sorted(str(p) for pattern in ("*.parquet", "data/*.parquet") for p in Path(text).glob(pattern)
                       if not p.name.startswith("."))
    else:
        files = sorted(glob.glob(text))
    of_split = [f for f in files if os.path.basename(f).startswith((f"{split}-", f"{split}."))]
    return of_split or files


@contextlib.contextmanager
def _offline_if_asked(datasets: Any) -> Iterator[bool]:
    # datasets reads HF_DATASETS_OFFLINE once at import; SNZOO_OFFLINE set later must still keep it off the network.
    offline = env_flag("SNZOO_OFFLINE") or env_flag("HF_DATASETS_OFFLINE") or env_flag("HF_HUB_OFFLINE")
    saved = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = saved or offline
    try:
        yield datasets.config.HF_HUB_OFFLINE
    finally:
        datasets.config.HF_HUB_OFFLINE = saved


def _load(source: str, split: str) -> Any:
    datasets = require("datasets", _WHAT)
    path = Path(source)
    try:
        if is_saved_dataset(path):
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise DataError(f"{path} has no split {split!r}; expected one of {', '.join(loaded)}")
                loaded = loaded[split]
            return loaded
        if path.is_dir() or source.endswith(".parquet"):
            files = parquet_files(source, split)
            if not files:
                raise DataError(f"no parquet files at {source}; expected shards such as "
                                f"data/{split}-00000-of-00014.parquet")
            return datasets.load_dataset("parquet", data_files={split: files}, split=split)
        with _offline_if_asked(datasets) as offline:
            try:
                return datasets.load_dataset(source, split=split)
            except DataError:
                raise
            except Exception as exc:  # the Hub client raises many types; all end here as one line
                if offline:
                    raise DataError(f"Hugging Face dataset {source!r} (split {split!r}) is not in the datasets cache "
                                    "and offline mode is on (SNZOO_OFFLINE / HF_DATASETS_OFFLINE); load it once "
                                    "online, or pass a local save_to_disk or parquet folder") from None
                raise DataError(f"cannot load Hugging Face dataset {source!r} split {split!r}: {first_line(exc)}; "
                                "expected a Hub dataset id you can access (gated sets need `hf auth login`)") from None
    except (OSError, ValueError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"cannot read {source} with {_WHAT}: {first_line(exc)}; expected a save_to_disk folder, "
                        "parquet shards or a Hub dataset id") from None


def _pick(columns: list[str], named: Optional[str], candidates: tuple[str, ...], what: str, source: str) -> str:
    if named is not None:
        if named not in columns:
            raise DataError(f"{source} has no column {named!r}; its columns are {', '.join(columns)}")
        return named
    found = next((c for c in candidates if c in columns), None)
    if found is None:
        option = "image_column" if what == "image" else "label_column"
        raise DataError(f"{source} has no {what} column (looked for {', '.join(candidates)}; columns: "
                        f"{', '.join(columns)}); name it with {option}=")
    return found


def _labels(dataset: Any, column: str, source: str) -> list[int]:
    feature = dataset.features[column]
    values = dataset.with_format(None)[column]
    where = f"{source} column {column!r}"
    names = getattr(feature, "names", None)
    if names is not None:
        if all(WNID_FORM.match(n) for n in names):
            by_id = [wnid_label(n, where) for n in names]
            return [by_id[check_index(v, len(names), where)] for v in values]
        if len(names) != len(imagenet_classes()):
            raise DataError(f"{where} has {len(names)} class names that are not WordNet ids (first {names[0]!r}); "
                            "expected WordNet-id names or ImageNet-1k's 1000 classes in sorted WordNet-id order")
    return [wnid_label(v, where) if isinstance(v, str) else check_label(v, where) for v in values]


def check_index(value: Any, count: int, where: str) -> int:
    """A ClassLabel value within its ``count`` names, or a ``DataError``."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < count:
        raise DataError(f"{where}: label {value!r} is outside its {count} class names; expected 0 to {count - 1}")
    return value


def _file_names(dataset: Any, image: str) -> list[str]:
    name_column = next((c for c in NAME_COLUMNS if c in dataset.column_names), None)
    if name_column is not None:
        return [os.path.basename(str(v)) for v in dataset.with_format(None)[name_column]]
    column = dataset.with_format("arrow")[image]
    if getattr(column.type, "get_field_index", lambda _: -1)("path") < 0:
        return [f"{i}" for i in range(len(dataset))]
    # Field by field per chunk stays zero-copy; combining the chunks would copy every image's bytes.
    paths = [p for chunk in column.chunks for p in chunk.field("path").to_pylist()]
    return [os.path.basename(p) if p else f"{i}" for i, p in enumerate(paths)]


class HFImageDataset(EncodedImageDataset):
    """A split of a Hugging Face dataset as evaluation samples; labels are ImageNet class indices."""

    def __init__(self, source: PathLike, transform: Transform | None, *, split: str = "validation",
                 image_column: Optional[str] = None, label_column: Optional[str] = None,
                 skip_bad: bool = False, decoder: str = "pil") -> None:
        super().__init__(transform, skip_bad, decoder)
        self.source = os.fspath(source)
        dataset = _load(self.source, split)
        columns = list(dataset.column_names)
        self.image_column = _pick(columns, image_column, IMAGE_COLUMNS, "image", self.source)
        self.label_column = _pick(columns, label_column, LABEL_COLUMNS, "label", self.source)
        features = require("datasets", _WHAT).Image
        if isinstance(dataset.features[self.image_column], features):
            dataset = dataset.cast_column(self.image_column, features(decode=False))
        labels = _labels(dataset, self.label_column, self.source)
        self.file_names = _file_names(dataset, self.image_column)
        self.samples = [(f"{self.source} [{split}] row {i} ({name})", label)
                        for i, (name, label) in enumerate(zip(self.file_names, labels))]
        if not self.samples:
            raise DataError(f"split {split!r} of {self.source} is empty; expected the validation images")
        self._images = dataset.select_columns([self.image_column]).with_format(None)

    def _read(self, index: int) -> bytes:
        value = self._images[index][self.image_column]
        if isinstance(value, dict):
            if value.get("bytes") is not None:
                return value["bytes"]
            if value.get("path"):
                with open(value["path"], "rb") as f:
                    return f.read()
        if isinstance(value, (bytes, bytearray)):
            return bytes(value)
        raise DataError(f"{self.samples[index][0]}: column {self.image_column!r} holds {type(value).__name__}, "
                        "not encoded image bytes; expected an Image feature or binary column")
