"""COCO-format detection data: an instances JSON (boxes, polygons or RLE masks, categories) and its images.

Layout (COCO 2017 and anything written the same way)::

    ROOT/annotations/instances_{split}*.json     e.g. instances_train2017.json, instances_val2017.json
    ROOT/{split}*/                               e.g. train2017/, val2017/ (paths in the JSON's file_name)

pycocotools reads the JSON and decodes polygons and RLE alike (``pip install snzoo[detection]``).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from snzoo._io import PathLike
from snzoo.data.datasets import DataError, _cause, load_rgb
from snzoo.errors import IntegrationImportError

__all__ = ["CocoDetection", "collate_detection"]

_LAYOUT = ("expected ROOT/annotations/instances_{split}*.json and the images in ROOT/{split}*/ "
           "(COCO 2017: annotations/instances_train2017.json and train2017/)")
_COCO_KEYS = ("images", "annotations", "categories")


def _pycocotools() -> Any:
    """The pycocotools package (imported on first use: it is an optional dependency)."""
    try:
        import pycocotools.coco
        import pycocotools.cocoeval
        import pycocotools.mask
    except ImportError:
        raise IntegrationImportError("COCO data and metrics need pycocotools, which is not installed; "
                                     "pip install snzoo[detection]") from None
    return pycocotools


def _quiet() -> contextlib.AbstractContextManager:
    # pycocotools prints progress ("loading annotations...", "DONE") to stdout, where results belong.
    return contextlib.redirect_stdout(io.StringIO())


def _one(paths: list[Path], what: str, root: Path, split: str) -> Path:
    if not paths:
        raise DataError(f"no {what} for split {split!r} under {root}; {_LAYOUT.format(split=split)}")
    if len(paths) > 1:
        names = ", ".join(p.name for p in paths)
        raise DataError(f"several {what}s for split {split!r} under {root} ({names}); pass annotations= and "
                        "images= to choose")
    return paths[0]


def _load_coco(path: Path) -> Any:
    """The pycocotools COCO object of an instances JSON, checked to be one."""
    coco_module = _pycocotools().coco
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except OSError as exc:
        raise DataError(f"cannot read COCO annotations {path}: {_cause(exc)}") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not valid JSON ({_cause(exc)}); expected a COCO instances file") from None
    if not isinstance(data, dict) or any(not isinstance(data.get(k), list) for k in _COCO_KEYS):
        raise DataError(f"{path} is not a COCO instances file; expected a JSON object with the lists "
                        f"{', '.join(_COCO_KEYS)}")
    if not data["categories"]:
        raise DataError(f"{path} has no categories; expected a 'categories' list of {{id, name}} objects")
    try:
        for item in data["images"]:
            int(item["id"]), str(item["file_name"]), int(item["height"]), int(item["width"])
        for item in data["categories"]:
            int(item["id"]), str(item["name"])
        for item in data["annotations"]:
            int(item["id"]), int(item["image_id"]), int(item["category_id"])
            x, y, w, h = (float(v) for v in item["bbox"])
            # COCOeval reads both; files written by other tools sometimes leave them out.
            item.setdefault("area", w * h)
            item.setdefault("iscrowd", 0)
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{path} is not a COCO instances file: an entry lacks or mistypes {_cause(exc)}; expected "
                        "images {id, file_name, height, width}, categories {id, name}, annotations "
                        "{id, image_id, category_id, bbox}") from None
    coco = coco_module.COCO()
    coco.dataset = data
    with _quiet():
        coco.createIndex()
    return coco


class CocoDetection(Dataset):
    """A COCO-format detection set; items ``(image, target)``, or ``transform(image, target)`` when given.

    ``image`` is a PIL RGB image; ``target`` holds ``boxes`` (float32 (K, 4) xyxy pixels), ``labels`` (int64
    (K,) = the COCO category ids, as torchvision's detection models take them), ``masks`` (uint8 (K, H, W),
    when ``masks``), ``image_id``, ``area`` and ``iscrowd``. Crowd annotations and boxes of zero area after
    clipping to the image are left out, as torchvision's references leave them out. ``annotations`` and
    ``images`` name the JSON and the image folder explicitly; else they are found under ``root`` by ``split``.
    ``num_classes`` is the largest category id + 1, the class count a detector built on these labels needs.
    """

    def __init__(self, root: Optional[PathLike] = None, split: str = "train", *,
                 annotations: Optional[PathLike] = None, images: Optional[PathLike] = None, masks: bool = True,
                 transform: Optional[Callable[[Any, dict], tuple[Any, dict]]] = None) -> None:
        if root is None and (annotations is None or images is None):
            raise DataError("CocoDetection needs root, or both annotations= and images=")
        base = Path(root) if root is not None else Path(".")
        if annotations is None:
            if not (base / "annotations").is_dir():
                raise DataError(f"{base} has no annotations folder; {_LAYOUT.format(split=split)}")
            found = sorted((base / "annotations").glob(f"instances_{split}*.json"))
            annotations = _one(found, "annotations file", base, split)
        if images is None:
            exact = base / split
            found = [exact] if exact.is_dir() else sorted(p for p in base.glob(f"{split}*") if p.is_dir())
            images = _one(found, "image folder", base, split)
        self.annotations_file, self.image_dir = Path(annotations), Path(images)
        if not self.image_dir.is_dir():
            raise DataError(f"image folder {self.image_dir} does not exist; {_LAYOUT.format(split=split)}")
        self.coco = _load_coco(self.annotations_file)
        self.split, self.masks, self.transform = split, bool(masks), transform
        self.ids: list[int] = sorted(self.coco.imgs)
        self.categories: dict[int, str] = {int(c["id"]): str(c["name"]) for c in self.coco.dataset["categories"]}
        self.num_classes = max(self.categories) + 1
        anns = self.coco.dataset["annotations"]
        self.has_masks = bool(anns) and all(a.get("segmentation") for a in anns)
        self._check_files()

    def _check_files(self) -> None:
        # One listing of the folder rather than a stat per image: COCO train has 118k images.
        try:
            present = set(os.listdir(self.image_dir))
        except OSError as exc:
            raise DataError(f"cannot list image folder {self.image_dir}: {_cause(exc)}") from exc
        for image_id in self.ids:
            name = str(self.coco.imgs[image_id]["file_name"])
            if name not in present and not (self.image_dir / name).is_file():
                raise DataError(f"image {self.image_dir / name} (image id {image_id}) listed in "
                                f"{self.annotations_file} is missing; expected every listed image in {self.image_dir}")

    @property
    def classes(self) -> list[str]:
        """Names by label: index = category id, "" where no category has that id (0 is the background)."""
        return [self.categories.get(i, "") for i in range(self.num_classes)]

    def __len__(self) -> int:
        return len(self.ids)

    def target(self, index: int) -> dict:
        """The target of item ``index`` without loading its image."""
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        height, width = int(info["height"]), int(info["width"])
        boxes, labels, areas, masks = [], [], [], []
        for ann in self.coco.imgToAnns.get(image_id, []):
            if ann.get("iscrowd", 0):
                continue
            x, y, w, h = (float(v) for v in ann["bbox"])
            box = [max(x, 0.0), max(y, 0.0), min(x + w, width), min(y + h, height)]
            if box[2] <= box[0] or box[3] <= box[1]:
                continue
            boxes.append(box)
            labels.append(int(ann["category_id"]))
            areas.append(float(ann.get("area", w * h)))
            if self.masks:
                masks.append(self._mask(ann, height, width))
        target = {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "image_id": int(image_id),
            "area": torch.tensor(areas, dtype=torch.float32),
            "iscrowd": torch.zeros(len(labels), dtype=torch.int64),
        }
        if self.masks:
            stacked = np.stack(masks) if masks else np.zeros((0, height, width), dtype=np.uint8)
            target["masks"] = torch.from_numpy(stacked)
        return target

    def _mask(self, ann: dict, height: int, width: int) -> np.ndarray:
        if not ann.get("segmentation"):
            raise DataError(f"annotation {ann['id']} in {self.annotations_file} has no segmentation; "
                            "use masks=False for box-only data")
        try:
            return self.coco.annToMask(ann).astype(np.uint8, copy=False)
        except Exception as exc:  # pycocotools raises bare Exceptions and TypeErrors for malformed masks
            raise DataError(f"annotation {ann['id']} in {self.annotations_file} has a segmentation pycocotools "
                            f"cannot decode ({_cause(exc)}); expected polygons or RLE") from None

    def __getitem__(self, index: int) -> tuple[Any, dict]:
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        image = load_rgb(self.image_dir / str(info["file_name"]))
        if image.size != (int(info["width"]), int(info["height"])):
            raise DataError(f"image {self.image_dir / info['file_name']} is {image.width}x{image.height} but "
                            f"{self.annotations_file} says {info['width']}x{info['height']}; expected them equal")
        target = self.target(index)
        if self.transform is not None:
            return self.transform(image, target)
        return image, target


def collate_detection(batch: Sequence[tuple]) -> tuple:
    """Detection batches as lists (images differ in size, targets in object count).

    Training items ``(image, target, index)`` give ``(images, targets, indices)`` with the indices as an int64
    tensor; evaluation items ``(image, target)`` give ``(images, targets)``.
    """
    if not batch:
        raise DataError("an empty detection batch; expected at least one item")
    width = len(batch[0])
    if width not in (2, 3) or any(len(item) != width for item in batch):
        raise DataError("detection items must all be (image, target) or all (image, target, index)")
    images = [item[0] for item in batch]
    targets = [item[1] for item in batch]
    if width == 2:
        return images, targets
    return images, targets, torch.tensor([int(item[2]) for item in batch], dtype=torch.int64)
