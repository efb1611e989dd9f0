"""Real photographs shipped inside scikit-image, matplotlib and scikit-learn, for tests where images matter."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from PIL import Image
from torchvision import transforms


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.origin is not None, f"{name} is needed for the test photographs"
    return Path(spec.origin).parent


def photo_paths() -> list[Path]:
    """Paths of real colour photographs of varied content and size."""
    skimage_data = _package_dir("skimage") / "data"
    paths = [
        skimage_data / "astronaut.png",
        skimage_data / "coffee.png",
        skimage_data / "chelsea.png",
        skimage_data / "rocket.jpg",
        _package_dir("matplotlib") / "mpl-data" / "sample_data" / "grace_hopper.jpg",
        _package_dir("sklearn") / "datasets" / "images" / "china.jpg",
        _package_dir("sklearn") / "datasets" / "images" / "flower.jpg",
    ]
    for path in paths:
        assert path.is_file(), f"missing test photograph {path}"
    return paths


def photo_batch(size: int = 224, count: int = 4) -> torch.Tensor:
    """The first `count` photographs as a normalised (count, 3, size, size) batch (resize, center crop)."""
    to_tensor = transforms.Compose([
        transforms.Resize(size * 256 // 224),
        transforms.CenterCrop(size),
        transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])
    images = [to_tensor(Image.open(p).convert("RGB")) for p in photo_paths()[:count]]
    return torch.stack(images)
