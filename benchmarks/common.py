"""Shared set-up of the benchmarks: a folder of real photographs and the environment line of a report."""

from __future__ import annotations

import importlib.util
import platform
import time
from pathlib import Path

import torch
from PIL import Image

from snzoo.tools.bench import training_step

PHOTOS = [
    ("skimage", "data/astronaut.png"), ("skimage", "data/coffee.png"), ("skimage", "data/chelsea.png"),
    ("skimage", "data/rocket.jpg"), ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
    ("sklearn", "datasets/images/china.jpg"), ("sklearn", "datasets/images/flower.jpg"),
]


def photo_sources() -> list[Image.Image]:
    """The real photographs of PHOTOS as RGB images at their own sizes."""
    sources = []
    for package, rel in PHOTOS:
        spec = importlib.util.find_spec(package)
        sources.append(Image.open(Path(spec.origin).parent / rel).convert("RGB"))
    return sources


def photo_folder(root: Path, images: int, classes: int = 8) -> Path:
    """An ImageNet-style folder of `images` JPEGs made from real photographs (flips and crops of them)."""
    sources = photo_sources()
    for i in range(images):
        image = sources[i % len(sources)]
        w, h = image.size
        step = (i // len(sources)) % 4
        image = image.crop((step * w // 16, step * h // 16, w - step * w // 16, h - step * h // 16))
        if (i // len(sources)) % 2:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        folder = root / f"class{i % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i:05d}.JPEG", quality=90)
    return root


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform's description elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> str:
    """Torch version, threads and hardware, for the report header."""
    return (f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
            f"python {platform.python_version()}")


def timed_train_step(model, images, labels, optimizer, loss_fn, autocast, sync, scaler=None) -> float:
    """Seconds of one training step (zero_grad, forward under `autocast`, backward, optimizer step; through a
    GradScaler when given), with `sync` waiting for the device on both ends."""
    sync()
    start = time.perf_counter()
    training_step(model, images, labels, optimizer, loss_fn, autocast, scaler)
    sync()
    return time.perf_counter() - start
