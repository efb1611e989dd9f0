"""Evaluation images: decoding files to RGB, and the two dataset layouts the published protocol uses.

Layouts:

* an image folder, ``ROOT/<wnid>/<image>``, with classes indexed in sorted folder order (the order every
  pretrained ImageNet model uses), or by position in the model's own class list when one is given;
* a list file, one ``relative/path label`` per line, as the original SN release ships for ImageNet val.

Each item is ``(image, label, index)``; ``index`` is the sample's position in ``dataset.samples`` so that
results can be traced back to files.

Unreadable images (``skip_bad``): with ``skip_bad=False`` an unreadable file raises ``BadImageError``. With
``skip_bad=True`` the dataset returns a ``Skipped(index, path, reason)`` record in place of the sample, and
``collate_skip_bad`` (pass it as the DataLoader's ``collate_fn``) batches the good samples and hands the
records back in ``EvalBatch.skipped``. The records travel inside the batch rather than being noted on the
dataset because DataLoader workers are separate processes: anything a worker writes to its copy of the
dataset never reaches the main process, whereas the batch does, for any ``num_workers``. The evaluation loop
gathers ``batch.skipped`` from every batch to report each skipped file at the end. A batch in which every
image was bad has zero rows (``len(batch.labels) == 0``) and should not be fed to the model.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate

from snzoo._io import PathLike
from snzoo.data.decoders import Decoded, check_decoder, decode_with
from snzoo.errors import BadImageError, DataError

IMG_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
_LAYOUT_HINT = "expected one sub-folder per class, e.g. {root}/n01440764/*.JPEG"

Transform = Callable[[Decoded], Any]


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _cause(exc: BaseException) -> str:
    # OSError's str() repeats the path we already name; its strerror alone is the cause.
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return _one_line(str(exc)) or type(exc).__name__


def _sixteen_bit_to_rgb(image: Image.Image) -> Image.Image:
    # PIL's own conversion clips 16-bit values at 255 (nearly every pixel turns white); scale the full range.
    # Mode "I" is included because older Pillow releases open 16-bit grayscale PNGs as "I".
    values = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
    gray = ((values * 255 + 32767) // 65535).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "I" or mode.startswith("I;16"):
        return _sixteen_bit_to_rgb(image)
    if mode in ("P", "PA", "LA", "La", "RGBa") or "transparency" in image.info:
        # Direct P->RGB warns or not depending on how transparency is stored; via RGBA the colour
        # result is the same every time and alpha is simply dropped.
        return image.convert("RGBA").convert("RGB")
    # EXIF orientation is deliberately not applied: the published protocol (torchvision's default loader)
    # does not apply it, and accuracy must be comparable.
    return image.convert("RGB")


def load_rgb(path: PathLike) -> Image.Image:
    """Decode an image file fully and return it as an 8-bit RGB PIL image.

    The format is detected from the content, not the name (PNG data in a ``.JPEG`` file works). Grayscale,
    CMYK, palette (with or without transparency) and 16-bit grayscale images are converted to RGB. A corrupt,
    truncated or unreadable file raises ``BadImageError`` naming the file and the cause.
    """
    try:
        with Image.open(path) as image:
            image.load()
            return _to_rgb(image)
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise BadImageError(f"cannot read image {os.fspath(path)}: {_cause(exc)}; "
                            "expected a complete, readable image file") from exc


def _file_bytes(path: PathLike) -> bytes | None:
    # None leaves the error to PIL's decoding of the same file, so both decoders word it the same way.
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def load_image(path: PathLike, decoder: str = "pil") -> Decoded:
    """``load_rgb(path)`` for the "pil" decoder; for "torchvision" a (3, H, W) uint8 RGB tensor (JPEGs decoded
    by libjpeg-turbo, other formats by PIL). Bad files raise the same ``BadImageError`` with both."""
    return decode_with(decoder, _file_bytes(path) if decoder != "pil" else None, lambda: load_rgb(path))


class Skipped(NamedTuple):
    """A sample whose image could not be read, returned in its place when ``skip_bad`` is on."""

    index: int
    path: str
    reason: str


class EvalBatch(NamedTuple):
    """A batch from ``collate_skip_bad``: the good samples, and the records of the ones that were skipped."""

    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    skipped: list[Skipped]


def collate_skip_bad(batch: Sequence[Any]) -> EvalBatch:
    """Collate ``(image, label, index)`` samples, setting ``Skipped`` records aside in ``EvalBatch.skipped``."""
    good = [item for item in batch if not isinstance(item, Skipped)]
    skipped = [item for item in batch if isinstance(item, Skipped)]
    if not good:
        empty = torch.empty(0, dtype=torch.long)
        return EvalBatch(torch.empty(0), empty, empty.clone(), skipped)
    images, labels, indices = default_collate(good)
    return EvalBatch(images, labels, indices, skipped)


class EvalDataset(Dataset):
    """Evaluation samples ``(path, label)`` read as ``(transform(image), label, index)``; subclasses build the list.

    ``decoder`` ("pil" or "torchvision", see ``snzoo.data.decoders``) decides whether ``transform`` receives
    PIL images or uint8 tensors.
    """

    samples: list[tuple[str, int]]
    num_classes: int

    def __init__(self, transform: Transform | None, skip_bad: bool, decoder: str = "pil") -> None:
        self.transform = transform
        self.skip_bad = skip_bad
        self.decoder = check_decoder(decoder)

    def __len__(self) -> int:
        return len(self.samples)

    def _decode(self, index: int) -> Decoded:
        return load_image(self.samples[index][0], self.decoder)

    def __getitem__(self, index: int) -> tuple[Any, int, int] | Skipped:
        where, label = self.samples[index]
        try:
            image = self._decode(index)
        except BadImageError as exc:
            if not self.skip_bad:
                raise
            return Skipped(index, where, str(exc))
        if self.transform is not None:
            image = self.transform(image)
        return image, label, index


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def _visible(name: str) -> bool:
    # Dot-entries are tool litter (.ipynb_checkpoints, macOS ._*.JPEG resource forks), never samples.
    return not name.startswith(".")


def _class_images(folder: Path) -> list[str]:
    # Same walk and order as torchvision's ImageFolder, so sample indices line up with it.
    found = []
    for dirpath, _, filenames in sorted(os.walk(folder, followlinks=True)):
        rel = os.path.relpath(dirpath, folder)
        if rel != "." and not all(_visible(part) for part in Path(rel).parts):
            continue
        found.extend(os.path.join(dirpath, name) for name in sorted(filenames) if _visible(name) and _is_image(name))
    return found


class ImageFolderDataset(EvalDataset):
    """ImageNet-style folder ``ROOT/<class>/<image>``; items are ``(transform(image), label, index)``.

    Labels are the position of the folder in sorted folder order, or in ``class_names`` when that is a list
    (the model's class list: then every folder must be one of its names). An int ``class_names`` is the
    model's class count: the folder count must equal it, since sorted positions are only right when all
    classes are present.
    """

    def __init__(self, root: PathLike, transform: Transform | None,
                 class_names: Sequence[str] | int | None = None, skip_bad: bool = False, decoder: str = "pil") -> None:
        super().__init__(transform, skip_bad, decoder)
        self.root = Path(root)
        folders = self._scan_root()
        self.classes, index_of = self._class_index(folders, class_names)
        self.num_classes = len(self.classes)
        self.samples = []
        empty = []
        for folder in folders:
            images = _class_images(self.root / folder)
            if not images:
                empty.append(folder)
            self.samples.extend((path, index_of[folder]) for path in images)
        if empty:
            raise DataError(f"{len(empty)} class folder(s) in {self.root} hold no images, first: "
                            f"{self.root / empty[0]}; expected images ending in {', '.join(IMG_EXTENSIONS)}")

    def _scan_root(self) -> list[str]:
        root = self.root
        if not root.exists():
            raise DataError(f"image folder {root} does not exist; {_LAYOUT_HINT.format(root=root)}")
        if not root.is_dir():
            raise DataError(f"{root} is not a directory; {_LAYOUT_HINT.format(root=root)}")
        entries = [e for e in os.scandir(root) if _visible(e.name)]
        folders = sorted(e.name for e in entries if e.is_dir())
        loose_images = sum(1 for e in entries if e.is_file() and _is_image(e.name))
        if not entries:
            raise DataError(f"image folder {root} is empty; {_LAYOUT_HINT.format(root=root)}")
        if not folders and loose_images:
            raise DataError(f"{root} holds {loose_images} image(s) directly but no class folders; "
                            f"{_LAYOUT_HINT.format(root=root)}")
        if not folders:
            raise DataError(f"{root} has no class folders; {_LAYOUT_HINT.format(root=root)}")
        return folders

    def _class_index(self, folders: list[str],
                     class_names: Sequence[str] | int | None) -> tuple[list[str], dict[str, int]]:
        if class_names is None:
            return folders, {name: i for i, name in enumerate(folders)}
        if isinstance(class_names, int):
            if len(folders) != class_names:
                raise DataError(f"{self.root} has {len(folders)} class folders but the model has {class_names} "
                                "classes; expected one folder per class so that sorted folder order gives the labels")
            return folders, {name: i for i, name in enumerate(folders)}
        names = list(class_names)
        index_of = {name: i for i, name in reversed(list(enumerate(names)))}
        unknown = [f for f in folders if f not in index_of]
        if unknown:
            raise DataError(f"class folder {self.root / unknown[0]} is not one of the model's {len(names)} classes "
                            f"({len(unknown)} unknown folder(s)); expected folder names such as {names[0]!r}")
        return names, index_of


def _parse_list_line(list_file: Path, number: int, text: str) -> tuple[str, int]:
    where = f"{list_file} line {number} {text!r}"
    parts = text.rsplit(None, 1)
    if len(parts) < 2:
        raise DataError(f"{where}: missing label; expected 'relative/path label'")
    rel, label_text = parts
    try:
        label = int(label_text)
    except ValueError:
        raise DataError(f"{where}: label {label_text!r} is not an integer; expected 'relative/path label'") from None
    if label < 0:
        raise DataError(f"{where}: label {label} is negative; expected a class index >= 0")
    return rel, label


class ListFileDataset(EvalDataset):
    """Samples from a list file with one ``relative/path label`` per line, paths relative to ``root``.

    The label is the last whitespace-separated field, so paths may contain spaces; blank lines are ignored.
    ``num_classes`` is the model's class count when given (labels must be below it), else max label + 1;
    ``classes`` are the class names in label order when given (ImageNet's WordNet ids), else the label numbers.
    """

    def __init__(self, list_file: PathLike, root: PathLike, transform: Transform | None,
                 skip_bad: bool = False, num_classes: int | None = None,
                 classes: Sequence[str] | None = None, decoder: str = "pil") -> None:
        super().__init__(transform, skip_bad, decoder)
        self.list_file = Path(list_file)
        self.root = Path(root)
        lines = self._read_lines()
        if not self.root.is_dir():
            raise DataError(f"image root {self.root} for {self.list_file} is not a directory; "
                            "expected the folder the list's paths are relative to")
        self.samples = []
        missing: list[tuple[int, str, str]] = []
        for number, text in lines:
            rel, label = _parse_list_line(self.list_file, number, text)
            if num_classes is not None and label >= num_classes:
                raise DataError(f"{self.list_file} line {number} {text!r}: label {label} is out of range; "
                                f"expected 0 to {num_classes - 1} for a {num_classes}-class model")
            path = os.path.join(self.root, rel)
            # Checked up front so a typo in root fails in a second, not hours into an evaluation.
            if not os.path.isfile(path):
                missing.append((number, text, path))
            self.samples.append((path, label))
        if not self.samples:
            raise DataError(f"list file {self.list_file} has no samples; expected one 'relative/path label' per line")
        if missing:
            number, text, path = missing[0]
            raise DataError(f"{len(missing)} of {len(self.samples)} files in {self.list_file} are missing, first: "
                            f"line {number} {text!r} ({path} not found); expected paths relative to {self.root}")
        self.num_classes = num_classes if num_classes is not None else max(label for _, label in self.samples) + 1
        self.classes = list(classes) if classes is not None else [str(i) for i in range(self.num_classes)]

    def _read_lines(self) -> list[tuple[int, str]]:
        if not self.list_file.is_file():
            raise DataError(f"list file {self.list_file} does not exist or is not a file; "
                            "expected a .txt file with one 'relative/path label' per line")
        try:
            text = self.list_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"cannot read list file {self.list_file}: {_cause(exc)}; "
                            "expected UTF-8 text with one 'relative/path label' per line") from exc
        return [(n, line.strip()) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]


def build_eval_dataset(data: PathLike, transform: Transform | None, root: PathLike | None = None,
                       class_names: Sequence[str] | int | None = None, skip_bad: bool = False,
                       decoder: str = "pil") -> EvalDataset:
    """The dataset for ``data``: a directory is an image folder, a ``.txt`` file a list file.

    ``root`` is where a list file's paths start (default: the list file's folder); ``class_names`` is the
    model's class list or class count, used to check the data against the model; ``decoder`` is "pil" or
    "torchvision" (``snzoo.data.decoders``).
    """
    path = Path(data)
    expected = "expected an image folder (one sub-folder per class) or a .txt list file of 'relative/path label'"
    if not path.exists():
        raise DataError(f"evaluation data {path} does not exist; {expected}")
    if path.is_dir():
        if root is not None:
            raise DataError(f"root {root} only applies to list files, but {path} is a folder; "
                            "expected no root with an image folder")
        return ImageFolderDataset(path, transform, class_names=class_names, skip_bad=skip_bad, decoder=decoder)
    if path.is_file() and path.suffix.lower() == ".txt":
        count = class_names if isinstance(class_names, int) or class_names is None else len(class_names)
        names = None if isinstance(class_names, int) or class_names is None else class_names
        return ListFileDataset(path, path.parent if root is None else root, transform,
                               skip_bad=skip_bad, num_classes=count, classes=names, decoder=decoder)
    raise DataError(f"evaluation data {path} is neither a folder nor a .txt list file; {expected}")
