"""Real detection and segmentation data with exactly known labels: Fashion-MNIST test garments pasted onto real
photographs (tests/photos.py) at seeded random places and scales.

A garment's mask is its pixels brighter than a threshold after nearest-neighbour scaling; those pixels, and only
those, are painted in a colour that contrasts with the photograph under them. Later garments occlude earlier ones:
each mask keeps only its visible pixels, and objects left with too few are dropped, so every mask and box is
exactly what the image shows. Category ids are Fashion-MNIST labels + 1 (1..10).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from snzoo.data.fashion_mnist import FashionMNIST
from photos import photo_paths

THRESHOLD = 40  # grey level above which a garment pixel belongs to the garment
MIN_PIXELS = 30  # objects with fewer visible pixels are dropped
IGNORE = 255
PALETTE = [0, 0, 0] + [c for i in range(1, 256) for c in ((i * 67) % 256, (i * 139) % 256, (i * 211) % 256)]


@dataclass
class Scene:
    """One image and its objects: (category_id, bool (H, W) mask, (x0, y0, x1, y1) box in pixel edges)."""

    image: Image.Image
    objects: list[tuple[int, np.ndarray, tuple[int, int, int, int]]] = field(default_factory=list)


def tight_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """The smallest box holding every pixel of ``mask``: x0 = min col, x1 = max col + 1 (likewise y)."""
    rows, cols = np.nonzero(mask)
    return int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1


def categories() -> list[dict]:
    """The COCO categories of the scenes: id = Fashion-MNIST label + 1."""
    return [{"id": i + 1, "name": name, "supercategory": "garment"} for i, name in enumerate(FashionMNIST.classes)]


@functools.lru_cache(maxsize=32)
def _photo(path: Path, height: int, width: int) -> np.ndarray:
    image = Image.open(path).convert("RGB")
    scale = max(height / image.height, width / image.width)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(size, Image.BILINEAR)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    photo = np.array(image.crop((left, top, left + width, top + height)))
    photo.flags.writeable = False
    return photo


def _tint(under: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # The colour farthest from the photograph's mean colour under the garment, from a few random candidates.
    candidates = rng.integers(0, 256, size=(8, 3)).astype(np.float64)
    mean = under.reshape(-1, 3).mean(axis=0)
    return candidates[np.argmax(((candidates - mean) ** 2).sum(axis=1))]


def make_scenes(count: int, size: tuple[int, int] = (128, 160), objects: tuple[int, int] = (1, 3),
                seed: int = 0) -> list[Scene]:
    """``count`` scenes of ``size`` = (height, width), each with ``objects`` = (fewest, most) garments pasted."""
    height, width = size
    rng = np.random.default_rng(seed)
    garments = FashionMNIST("test")
    photos = photo_paths()
    scenes = []
    for _ in range(count):
        pixels = _photo(photos[int(rng.integers(len(photos)))], height, width).astype(np.float64)
        placed: list[tuple[int, np.ndarray]] = []
        for _ in range(int(rng.integers(objects[0], objects[1] + 1))):
            index = int(rng.integers(len(garments)))
            grey = garments.images[index]
            side = int(rng.integers(28, min(height, width, 84) + 1))
            # Nearest-neighbour scaling: source pixel floor(i * 28 / side) for target pixel i.
            src = np.arange(side) * 28 // side
            scaled = grey[src][:, src].astype(np.float64)
            top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
            mask = np.zeros((height, width), dtype=bool)
            mask[top:top + side, left:left + side] = scaled > THRESHOLD
            if not mask.any():
                continue
            region = pixels[top:top + side, left:left + side]
            tint = _tint(region[scaled > THRESHOLD], rng)
            shade = 0.55 + 0.45 * scaled[..., None] / 255.0
            region[:] = np.where((scaled > THRESHOLD)[..., None], tint * shade, region)
            placed = [(c, m & ~mask) for c, m in placed] + [(int(garments.targets[index]) + 1, mask)]
        scene = Scene(Image.fromarray(np.round(pixels).astype(np.uint8)))
        scene.objects = [(c, m, tight_box(m)) for c, m in placed if m.sum() >= MIN_PIXELS]
        scenes.append(scene)
    return scenes


def write_coco(scenes: list[Scene], root: Path, split: str = "train") -> Path:
    """A COCO-format folder: root/annotations/instances_{split}.json and root/{split}/NNNNNN.png; returns root."""
    from pycocotools import mask as mask_util

    root = Path(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / split).mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id, scene in enumerate(scenes, start=1):
        name = f"{image_id:06d}.png"
        scene.image.save(root / split / name)
        images.append({"id": image_id, "file_name": name, "height": scene.image.height, "width": scene.image.width})
        for category, mask, (x0, y0, x1, y1) in scene.objects:
            rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                                "segmentation": rle, "area": int(mask.sum()), "bbox": [x0, y0, x1 - x0, y1 - y0],
                                "iscrowd": 0})
    data = {"images": images, "annotations": annotations, "categories": categories()}
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return root


def label_map(scene: Scene) -> np.ndarray:
    """The scene's index mask: 0 background, the category id on each object's pixels, 255 on a 1-pixel ring of
    background around each object (VOC's "ignore" border; object pixels always keep their class)."""
    height, width = scene.image.height, scene.image.width
    labels = np.zeros((height, width), dtype=np.uint8)
    ring = np.zeros((height + 2, width + 2), dtype=bool)
    for category, mask, _ in scene.objects:
        labels[mask] = category
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                ring[dy:dy + height, dx:dx + width] |= mask
    labels[ring[1:-1, 1:-1] & (labels == 0)] = IGNORE
    return labels


def write_segmentation(scenes: list[Scene], root: Path, split: str = "train", layout: str = "voc") -> Path:
    """A segmentation folder: VOC's JPEGImages/ID.png, SegmentationClass/ID.png (palette index masks) and
    ImageSets/Segmentation/{split}.txt, or (layout "folders") images/, masks/ and {split}.txt; plus classes.txt."""
    root = Path(root)
    if layout == "voc":
        image_dir, mask_dir, list_file = root / "JPEGImages", root / "SegmentationClass", \
            root / "ImageSets" / "Segmentation" / f"{split}.txt"
    else:
        image_dir, mask_dir, list_file = root / "images", root / "masks", root / f"{split}.txt"
    for folder in (image_dir, mask_dir, list_file.parent):
        folder.mkdir(parents=True, exist_ok=True)
    stems = []
    for number, scene in enumerate(scenes):
        stem = f"{split}_{number:06d}"
        scene.image.save(image_dir / f"{stem}.png")
        mask = Image.frombytes("P", scene.image.size, label_map(scene).tobytes())
        mask.putpalette(PALETTE)
        mask.save(mask_dir / f"{stem}.png")
        stems.append(stem)
    list_file.write_text("".join(f"{s}\n" for s in stems))
    (root / "classes.txt").write_text("\n".join(["background", *FashionMNIST.classes]) + "\n")
    return root
