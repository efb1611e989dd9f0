"""Evaluation throughput: snzoo.evaluate against the obvious ImageFolder + DataLoader + model loop.

Both run the same model (resnet50v1_sn, random weights, eval mode) over the same folder of real photographs
in the same process; the report is images per second and their ratio.

    .venv/bin/python benchmarks/eval_throughput.py [--images 256] [--batch-size 32] [--channels-last]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

import snzoo
from snzoo.data import build_eval_dataset, eval_transform
from snzoo.eval import default_workers, evaluate

from common import environment, photo_folder


def plain_loop(model, root: Path, batch_size: int, workers: int) -> float:
    """Images per second of the loop most people write first."""
    transform = transforms.Compose([
        transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])
    loader = DataLoader(datasets.ImageFolder(str(root), transform), batch_size=batch_size, num_workers=workers)
    n = 0
    start = time.perf_counter()
    with torch.no_grad():
        for images, labels in loader:
            model(images)
            n += labels.numel()
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = snzoo.create_model("resnet50v1_sn", num_classes=8).eval()
    workers = default_workers()
    with tempfile.TemporaryDirectory() as tmp:
        root = photo_folder(Path(tmp) / "val", args.images)
        dataset = build_eval_dataset(root, eval_transform(), class_names=8)
        evaluate(model, dataset, batch_size=args.batch_size, workers=workers, limit=args.batch_size)  # warm-up
        plain, ours = [], []
        for _ in range(args.repeats):
            plain.append(plain_loop(model, root, args.batch_size, workers))
            result = evaluate(model, dataset, batch_size=args.batch_size, workers=workers,
                              channels_last=args.channels_last, progress=False)
            ours.append(result.images_per_s)
    best_plain, best_ours = max(plain), max(ours)
    print(f"# eval throughput, resnet50v1_sn, {args.images} real photos, batch {args.batch_size}, "
          f"{workers} workers{', channels_last' if args.channels_last else ''}")
    print(f"# {environment()}")
    print(f"plain ImageFolder loop : {best_plain:8.2f} img/s")
    print(f"snzoo.evaluate         : {best_ours:8.2f} img/s")
    print(f"ratio snzoo / plain    : {best_ours / best_plain:8.3f}")


if __name__ == "__main__":
    main()
