"""Semantic segmentation folders: images and index masks (one class index per pixel, 255 = ignore).

Layouts::

    VOC:      ROOT/JPEGImages/ID.jpg (or .png ...), ROOT/SegmentationClass/ID.png,
              ROOT/ImageSets/Segmentation/{split}.txt (one ID per line)
    folders:  ROOT/images/NAME.jpg, ROOT/masks/NAME.png (same stems); ROOT/{split}.txt lists the stems to use,
              else every image is used

Masks are single-channel PNGs: palette ("P", as VOC ships them: the palette index is the class) or greyscale.
An optional ROOT/classes.txt names the classes, one per line in index order (background first).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from snzoo._io import PathLike
from snzoo.data.datasets import IMG_EXTENSIONS, DataError, _cause, load_rgb
from snzoo.data.pair_transforms import SEGMENTATION_IGNORE

__all__ = ["SegmentationFolder"]

_LAYOUT = ("expected VOC's JPEGImages/, SegmentationClass/ and ImageSets/Segmentation/{split}.txt, or images/ "
           "and masks/ with the same file stems (and optionally {split}.txt)")


def _by_stem(folder: Path) -> dict[str, str]:
    try:
        names = os.listdir(folder)
    except OSError as exc:
        raise DataError(f"cannot list {folder}: {_cause(exc)}") from exc
    return {os.path.splitext(n)[0]: n for n in sorted(names) if n.lower().endswith(IMG_EXTENSIONS)}


def _read_ids(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read list file {path}: {_cause(exc)}") from exc
    ids = [line.split()[0] for line in lines if line.strip()]
    if not ids:
        raise DataError(f"list file {path} names no images; expected one image id per line")
    return ids


def read_index_mask(path: PathLike) -> np.ndarray:
    """The class indices of a mask file as a uint8 (H, W) array: palette indices or grey values."""
    try:
        with Image.open(path) as mask:
            mask.load()
            mode = mask.mode
            array = np.array(mask)
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"cannot read mask {os.fspath(path)}: {_cause(exc)}; expected a PNG index mask") from exc
    if mode not in ("P", "L"):
        raise DataError(f"mask {os.fspath(path)} is a {mode} image; expected one class index per pixel "
                        "(a palette 'P' or greyscale 'L' PNG), not colours")
    return array


class SegmentationFolder(Dataset):
    """A segmentation folder (VOC or images/ + masks/ layout); items ``(image, mask)``, or
    ``transform(image, mask)`` when given.

    ``image`` is a PIL RGB image and ``mask`` an int64 (H, W) tensor of class indices, 255 where a pixel is
    ignored (VOC's object borders). ``num_classes`` is the class count when given; else the number of names in
    ROOT/classes.txt when that file exists; else it is found by reading every mask once: the largest value
    other than 255, plus 1 (so pass it for large sets, or when the highest classes may be absent from the data).
    A mask value from ``num_classes`` to 254 raises DataError naming the file. ``classes`` are the names of
    ROOT/classes.txt when it exists, else "0", "1", ...
    """

    def __init__(self, root: PathLike, split: str = "train", *,
                 transform: Optional[Callable[[Any, torch.Tensor], tuple[Any, Any]]] = None,
                 num_classes: Optional[int] = None) -> None:
        self.root, self.split, self.transform = Path(root), split, transform
        self.samples = self._find_samples()
        names = self._class_names()
        if num_classes is None and names is not None:
            num_classes = len(names)
        if num_classes is None:
            largest = max(self._largest_label(mask) for _, mask in self.samples)
            if largest < 0:
                raise DataError(f"every mask under {self.root} is all 255 (ignore); pass num_classes")
            num_classes = largest + 1
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 1 <= num_classes <= 255:
            raise DataError(f"num_classes must be a whole number from 1 to 255, got {num_classes!r}")
        if names is not None and len(names) != num_classes:
            raise DataError(f"{self.root / 'classes.txt'} names {len(names)} classes but num_classes is "
                            f"{num_classes}; expected one name per class, background first")
        self.num_classes = num_classes
        self.classes = names if names is not None else [str(i) for i in range(num_classes)]

    def _find_samples(self) -> list[tuple[Path, Path]]:
        root = self.root
        if (root / "JPEGImages").is_dir() and (root / "SegmentationClass").is_dir():
            image_dir, mask_dir = root / "JPEGImages", root / "SegmentationClass"
            list_file: Optional[Path] = root / "ImageSets" / "Segmentation" / f"{self.split}.txt"
            if not list_file.is_file():
                raise DataError(f"VOC list file {list_file} does not exist; expected one image id per line")
        elif (root / "images").is_dir() and (root / "masks").is_dir():
            image_dir, mask_dir = root / "images", root / "masks"
            list_file = root / f"{self.split}.txt"
            list_file = list_file if list_file.is_file() else None
        else:
            raise DataError(f"{root} is not a segmentation folder; {_LAYOUT.format(split=self.split)}")
        images, masks = _by_stem(image_dir), _by_stem(mask_dir)
        ids = _read_ids(list_file) if list_file is not None else sorted(images)
        if not ids:
            raise DataError(f"{image_dir} holds no images; {_LAYOUT.format(split=self.split)}")
        samples = []
        for stem in ids:
            if stem not in images:
                raise DataError(f"image {stem} (listed in {list_file or image_dir}) has no file in {image_dir}")
            if stem not in masks:
                raise DataError(f"image {image_dir / images[stem]} has no mask {stem}.png in {mask_dir}")
            samples.append((image_dir / images[stem], mask_dir / masks[stem]))
        return samples

    @staticmethod
    def _largest_label(path: Path) -> int:
        values = np.unique(read_index_mask(path))
        values = values[values != SEGMENTATION_IGNORE]
        return int(values.max()) if values.size else -1

    def _class_names(self) -> Optional[list[str]]:
        path = self.root / "classes.txt"
        if not path.is_file():
            return None
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"cannot read class names {path}: {_cause(exc)}") from exc
        names = [line.strip() for line in lines if line.strip()]
        if not names:
            raise DataError(f"{path} names no classes; expected one name per line, background first")
        return names

    def __len__(self) -> int:
        return len(self.samples)

    def mask(self, index: int) -> torch.Tensor:
        """The int64 (H, W) mask of item ``index``, checked against ``num_classes``."""
        path = self.samples[index][1]
        array = read_index_mask(path)
        bad = (array >= self.num_classes) & (array != SEGMENTATION_IGNORE)
        if bad.any():
            raise DataError(f"mask {path} holds value {int(array[bad].max())}, outside 0 to {self.num_classes - 1} "
                            f"and not {SEGMENTATION_IGNORE} (ignore); fix the mask or pass a larger num_classes")
        return torch.from_numpy(array.astype(np.int64))

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        image_path = self.samples[index][0]
        image, mask = load_rgb(image_path), self.mask(index)
        if tuple(mask.shape) != (image.height, image.width):
            raise DataError(f"mask {self.samples[index][1]} is {mask.shape[1]}x{mask.shape[0]} but image "
                            f"{image_path} is {image.width}x{image.height}; expected them equal")
        if self.transform is not None:
            return self.transform(image, mask)
        return image, mask
