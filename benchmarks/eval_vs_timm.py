"""Evaluation throughput on real files: `snzoo eval`'s data path and engine against timm's validation loop.

Both sides run the same resnet50v1_sn instance (random weights, eval mode) over the same folder of real
photographs at their real sizes (JPEG, WordNet-id class folders), with the same batch size and workers, in
interleaved rounds (snzoo, timm, snzoo, timm, ...). timm's side is its validate.py loop built from timm's
library API: resolve_data_config, create_dataset (ImageFolder), create_loader (prefetcher on, as validate.py
defaults), a warm-up forward, torch.no_grad(), timm.utils.accuracy. A round's seconds run from building the
dataset to the last batch (timm's warm-up forward left out, as validate.py leaves it out of its own timing), so
folder scans and worker start-up count on both sides.

    .venv/bin/python benchmarks/eval_vs_timm.py [--images 64] [--rounds 3] [--batch-size 16] [--workers N]
        [--decoders pil,torchvision] [--device cpu|cuda] [--out results]
"""

from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

import snzoo
from snzoo.data import BatchNormalize, EvalDataset, build_eval_dataset, eval_uint8_transform_from_config
from snzoo.eval import IMAGENET_EVAL, class_names_for, default_workers, evaluate, imagenet_wnids, make_loader

from common import PHOTOS, cpu_model, environment, photo_sources


def real_photo_folder(root: Path, images: int, classes: int = 8) -> Path:
    """`images` JPEGs of the real photographs at their real sizes in `classes` WordNet-id folders.

    Each copy is re-encoded at its own quality (and every other round mirrored) so no two files are the same
    bytes, while the pixel counts stay those of the photographs.
    """
    sources = photo_sources()
    wnids = imagenet_wnids()[:: len(imagenet_wnids()) // classes][:classes]
    for i in range(images):
        image = sources[i % len(sources)]
        if (i // len(sources)) % 2:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        folder = root / wnids[i % classes]
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i:05d}.JPEG", quality=80 + (i // len(sources)) % 16)
    return root


def snzoo_dataset(root: Path, decoder: str) -> tuple[EvalDataset, BatchNormalize]:
    """The dataset `snzoo eval --data ROOT --decoder DECODER` reads (uint8 images), and its per-batch normalisation."""
    transform, normalize = eval_uint8_transform_from_config(IMAGENET_EVAL, decoder=decoder)
    return build_eval_dataset(root, transform, class_names=class_names_for(root, 1000), decoder=decoder), normalize


def snzoo_round(model, root: Path, batch_size: int, workers: int, device: str, decoder: str,
                limit: int | None = None) -> tuple[int, float]:
    """(images, seconds) of what `snzoo eval --data ROOT` runs once the model is loaded."""
    start = time.perf_counter()
    dataset, normalize = snzoo_dataset(root, decoder)
    result = evaluate(model, dataset, batch_size=batch_size, workers=workers, device=device, progress=False,
                      limit=limit, normalize=normalize)
    return result.n, time.perf_counter() - start


def timm_config(model) -> dict:
    """timm's data config of the 1-crop protocol snzoo uses: bilinear, crop_pct 0.875 (resize 256, crop 224)."""
    from timm.data import resolve_data_config

    return resolve_data_config({"interpolation": "bilinear", "crop_pct": 0.875}, model=model)


def timm_loader(config: dict, root: Path, batch_size: int, workers: int, device: str):
    """timm's validation loader over ROOT, as validate.py builds it."""
    from timm.data import create_dataset, create_loader

    dataset = create_dataset("", root=str(root), split="validation")
    loader = create_loader(dataset, input_size=config["input_size"], batch_size=batch_size, use_prefetcher=True,
                           interpolation=config["interpolation"], mean=config["mean"], std=config["std"],
                           num_workers=workers, crop_pct=config["crop_pct"], crop_mode=config["crop_mode"],
                           pin_memory=False, device=torch.device(device))
    return loader


def data_only_round(side: str, model, root: Path, batch_size: int) -> tuple[int, float]:
    """(images, seconds) of one side's data pipeline alone, in this process (no workers, no model): decode,
    resize, crop, tensor conversion, normalisation and collation, which the model's time hides on a CPU."""
    start = time.perf_counter()
    if side == "timm":
        loader = timm_loader(timm_config(model), root, batch_size, 0, "cpu")
    else:
        dataset, normalize = snzoo_dataset(root, side.split("-", 1)[1])
        loader = ((normalize(batch[0]), batch[1]) for batch in make_loader(dataset, batch_size, workers=0))
    n = sum(len(batch[1]) for batch in loader)
    return n, time.perf_counter() - start


def timm_round(model, root: Path, batch_size: int, workers: int, device: str) -> tuple[int, float]:
    """(images, seconds) of timm's validate.py loop with its default settings (prefetcher on, no pin_mem)."""
    from timm.utils import AverageMeter, accuracy

    config = timm_config(model)
    model.eval()
    with torch.no_grad():
        # validate.py's warm-up forward, which its own timing leaves out too.
        model(torch.randn((batch_size,) + tuple(config["input_size"]), device=device))
    start = time.perf_counter()
    loader = timm_loader(config, root, batch_size, workers, device)
    criterion = torch.nn.CrossEntropyLoss().to(device)
    losses, top1, top5 = AverageMeter(), AverageMeter(), AverageMeter()
    n = 0
    with torch.no_grad():
        for images, target in loader:
            output = model(images)
            loss = criterion(output, target)
            acc1, acc5 = accuracy(output.detach(), target, topk=(1, 5))
            losses.update(loss.item(), images.size(0))
            top1.update(acc1.item(), images.size(0))
            top5.update(acc5.item(), images.size(0))
            n += images.size(0)
    return n, time.perf_counter() - start


def summarize(rows: list[dict]) -> dict[str, dict]:
    """Best and median images/s of each side."""
    sides: dict[str, list[float]] = {}
    for row in rows:
        sides.setdefault(row["side"], []).append(row["images_per_s"])
    return {side: {"best": max(v), "median": statistics.median(v), "rounds": len(v)} for side, v in sides.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=None, help="default: the CPU count")
    parser.add_argument("--decoders", default="pil,torchvision", help="snzoo decoders to run, comma-separated")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "results")
    args = parser.parse_args()
    import timm

    torch.manual_seed(0)
    model = snzoo.create_model("resnet50v1_sn").eval().to(args.device)
    workers = default_workers() if args.workers is None else args.workers
    decoders = [d for d in args.decoders.split(",") if d]
    header = (f"resnet50v1_sn (random init), {args.images} real photographs ({len(PHOTOS)} sources, real sizes, "
              f"JPEG), batch {args.batch_size}, {workers} workers, device {args.device}\n"
              f"torch {torch.__version__}, timm {timm.__version__}, {torch.get_num_threads()} threads, "
              f"CPU {cpu_model()}; {environment()}")
    print("#", header.replace("\n", "\n# "), flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = real_photo_folder(Path(tmp) / "val", args.images)
        for decoder in decoders:  # one batch each: first-call costs (thread pools, allocator) stay out of the rounds
            snzoo_round(model, root, args.batch_size, workers, args.device, decoder, limit=args.batch_size)
        for round_ in range(1, args.rounds + 1):
            sides = [(f"snzoo-{d}", lambda d=d: snzoo_round(model, root, args.batch_size, workers, args.device, d))
                     for d in decoders]
            sides.append(("timm", lambda: timm_round(model, root, args.batch_size, workers, args.device)))
            sides += [(f"data-only:{side}", lambda side=side: data_only_round(side, model, root, args.batch_size))
                      for side in [f"snzoo-{d}" for d in decoders] + ["timm"]]
            for side, run in sides:
                images, seconds = run()
                rows.append({"side": side, "round": round_, "images": images, "seconds": round(seconds, 4),
                             "images_per_s": round(images / seconds, 3)})
                print(f"round {round_} {side:28s} {images} images {seconds:8.2f} s {images / seconds:8.2f} img/s",
                      flush=True)
    summary = summarize(rows)
    lines = [header, ""]
    for side, stats in summary.items():
        lines.append(f"{side:28s} best {stats['best']:8.2f} img/s  median {stats['median']:8.2f} img/s "
                     f"({stats['rounds']} rounds)")
    for side in summary:
        base = "data-only:timm" if side.startswith("data-only:") else "timm"
        if side != base:
            lines.append(f"ratio {side} / {base}: best {summary[side]['best'] / summary[base]['best']:.3f}  "
                         f"median {summary[side]['median'] / summary[base]['median']:.3f}")
    print("\n".join(lines[2:]))
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "eval_vs_timm.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["side", "round", "images", "seconds", "images_per_s"])
        writer.writeheader()
        writer.writerows(rows)
    (args.out / "eval_vs_timm.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
