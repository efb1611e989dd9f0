"""Training-loop overhead: `snzoo train` (snzoo.train.train) against a plain PyTorch loop, steady state.

Both train the same model (resnet20_bn and resnet20_sn at their Fashion-MNIST recipe, 1 device x 32 images) on
the same data (snzoo's FashionMNIST training set) with the same augmentation transform, batch, DataLoader workers
(snzoo's default: the CPU count) and SGD (the recipe's peak lr, momentum and weight decay), in this process.
The plain loop is DataLoader(shuffle=True) -> forward -> cross-entropy -> backward -> step, nothing else.

Steady state, start-up excluded: both loops are clocked every W = 10 steps (snzoo by the `time` of the train lines
its run writes to metrics.jsonl every log_every = 10 steps, its default; the plain loop by the same wall clock at
the same steps), so each W-step window holds W whole steps and, for snzoo, one log line, as in any run. The first
WARMUP windows of a run (DataLoader workers starting, first allocations) are dropped. Reported per loop:
 - best round: W x batch x windows / their total time in the least disturbed round (every cost counted);
 - median window: W x batch / the median window over all rounds (robust to a stall of the machine).
The rounds interleave the loops, so a load that comes and goes touches all of them alike.

    .venv/bin/python benchmarks/train_loop.py [--steps 200] [--rounds 3] [--workers N] [--out results/train_loop.csv]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import io
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import snzoo
from snzoo import zoo
from snzoo.data.augment import train_transform
from snzoo.data.fashion_mnist import FASHION_MNIST_MEAN, FASHION_MNIST_STD, FashionMNIST
from snzoo.eval import default_workers
from snzoo.train import TrainConfig, train
from snzoo.train.recipe import peak_learning_rate
from snzoo.train.run_log import read_metrics

from common import cpu_model, environment

ENTRIES = ("resnet20_bn.fmnist_1x32_cos2", "resnet20_sn.fmnist_1x32_cos2")
SEED = 0
WINDOW = 10  # snzoo's default log_every
WARMUP = 2  # windows dropped at the start of every run


def _windows(clock: list[float]) -> list[float]:
    """Durations of the W-step windows between consecutive clock readings, warm-up dropped."""
    return [b - a for a, b in zip(clock, clock[1:])][WARMUP:]


def plain_loop(entry: str, recipe: dict, steps: int, workers: int) -> list[float]:
    """Window durations of the loop most people write."""
    torch.manual_seed(SEED)
    model = snzoo.create_model(entry.split(".")[0], num_classes=FashionMNIST.num_classes).train()
    opt = recipe["optimizer"]
    optimizer = torch.optim.SGD(model.parameters(), lr=peak_learning_rate(recipe), momentum=opt["momentum"],
                                weight_decay=opt["weight_decay"], nesterov=opt["nesterov"])
    dataset = FashionMNIST("train", transform=train_transform(recipe["augmentation"], FASHION_MNIST_MEAN,
                                                              FASHION_MNIST_STD))
    batch = recipe["batch"]["devices"] * recipe["batch"]["per_device"]
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True)
    clock = []
    for step, (images, labels, _) in enumerate(loader, start=1):
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % WINDOW == 0:
            clock.append(time.time())
        if step == steps:
            break
    return _windows(clock)


def snzoo_loop(entry: str, recipe: dict, steps: int, workers: int, root: Path) -> list[float]:
    """Window durations of a snzoo.train.train run of `steps` steps (--max-steps), from its metrics.jsonl."""
    output = Path(tempfile.mkdtemp(dir=root))
    cfg = TrainConfig(name=entry, recipe=copy.deepcopy(recipe), data="fashion-mnist", output=output, workers=workers,
                      seed=SEED, max_steps=steps, progress=False, log_every=WINDOW)
    with contextlib.redirect_stderr(io.StringIO()):  # the run's progress lines
        summary = train(cfg)
    assert summary["steps"] == steps, summary
    clock = [r["time"] for r in read_metrics(output) if r["split"] == "train"]
    assert len(clock) == steps // WINDOW, len(clock)
    return _windows(clock)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="steps per run (the first 20 are warm-up)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: snzoo's, the CPUs)")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parent.parent / "results" / "train_loop.csv")
    args = parser.parse_args()
    workers = default_workers() if args.workers is None else args.workers
    recipes = {name: zoo.get_entry(name).recipe for name in ENTRIES}
    per_epoch = min(60000 // (r["batch"]["devices"] * r["batch"]["per_device"]) for r in recipes.values())
    if not (WARMUP + 2) * WINDOW <= args.steps < per_epoch or args.steps % WINDOW:
        parser.error(f"--steps must be a multiple of {WINDOW} from {(WARMUP + 2) * WINDOW} to below one epoch "
                     f"({per_epoch} steps)")
    windows: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        # Warm-up: the SN kernel build, the data set's decoding and the allocator's first pages.
        for name, recipe in recipes.items():
            plain_loop(name, recipe, WINDOW, workers)
            snzoo_loop(name, recipe, WINDOW, workers, Path(tmp))
        for round_ in range(args.rounds):
            for name, recipe in recipes.items():
                for loop in ("plain", "snzoo"):
                    run = plain_loop(name, recipe, args.steps, workers) if loop == "plain" else \
                        snzoo_loop(name, recipe, args.steps, workers, Path(tmp))
                    windows.setdefault((name, loop), []).append(run)
            print(f"# round {round_ + 1}/{args.rounds} done", flush=True)
    rows = []
    for name, recipe in recipes.items():
        batch = recipe["batch"]["devices"] * recipe["batch"]["per_device"]
        best, median = {}, {}
        for loop in ("plain", "snzoo"):
            runs = windows[(name, loop)]
            best[loop] = max(WINDOW * batch * len(run) / sum(run) for run in runs)
            median[loop] = WINDOW * batch / statistics.median(w for run in runs for w in run)
            rows.append({"model": name, "loop": loop, "batch": batch, "workers": workers, "steps": args.steps,
                         "rounds": args.rounds, "windows": sum(len(run) for run in runs),
                         "best_round_images_per_s": round(best[loop], 2),
                         "median_window_images_per_s": round(median[loop], 2),
                         "ratio_best_round": round(best[loop] / best["plain"], 4),
                         "ratio_median_window": round(median[loop] / median["plain"], 4),
                         "threads": torch.get_num_threads(), "torch": torch.__version__, "cpu": cpu_model()})
    print(f"# training loop, Fashion-MNIST, batch {batch}, {workers} workers, {args.steps} steps per run "
          f"({WARMUP * WINDOW} warm-up), windows of {WINDOW} steps, {args.rounds} rounds")
    print(f"# {environment()}; {cpu_model()}")
    print(f"{'model':30s} {'loop':6s} {'best round':>12s} {'ratio':>6s} {'median win':>12s} {'ratio':>6s}")
    for row in rows:
        print(f"{row['model']:30s} {row['loop']:6s} {row['best_round_images_per_s']:8.1f} img/s "
              f"{row['ratio_best_round']:6.3f} {row['median_window_images_per_s']:8.1f} img/s "
              f"{row['ratio_median_window']:6.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"# wrote {args.out}")


if __name__ == "__main__":
    main()
