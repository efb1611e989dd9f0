"""One norm layer in eval, SN against torch's BatchNorm2d, at the layer shapes of the grid's models (CPU).

The grid (`sn_speed.py --grid`) compares whole models, where SN's operator also takes the ReLU after it and a residual
block's `+ shortcut` (`snzoo.nn.norm_relu`) and BN's model runs them as separate operations, as torchvision's ResNets
do. This benchmark separates the two: per layer shape, dtype and layout it times

- the layer alone: SwitchNorm2d(x) against BatchNorm2d(x);
- the layer and its ReLU as the models run them: norm_relu(sn, relu, x) against relu(bn(x)) (in place);
- the end of a residual block: norm_relu(sn, relu, x, shortcut) against relu(bn(x) + shortcut);

with gradients off, the two layers taking turns (interleaved rounds, each averaging as many calls as take about
20 ms), and reports the ratio of the fastest rounds and of the medians. It runs with the grid's malloc settings
(freed memory stays in glibc's heap, so that page faults of fresh outputs do not dominate; both layers alike).

    .venv/bin/python benchmarks/sn_layers.py [--rounds 7] [--shapes resnet20] [--csv results/sn_layers_cpu.csv]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import snzoo.nn as snn
from sn_grid import TIMING_MALLOC, environment, write_csv

RESULTS = Path(__file__).resolve().parent.parent / "results"
SHAPES = [
    ("ResNet-50 stem, batch 8", (8, 64, 112, 112)),
    ("ResNet-50 layer1, batch 8", (8, 256, 56, 56)),
    ("ResNet-50 layer2, batch 8", (8, 128, 28, 28)),
    ("ResNet-50 layer4, batch 8", (8, 2048, 7, 7)),
    ("resnet20 stage 1, batch 8", (8, 16, 28, 28)),
    ("resnet20 stage 3, batch 8", (8, 64, 7, 7)),
    ("resnet20 stage 3, batch 128", (128, 64, 7, 7)),
]
SETTINGS = [(torch.float32, "NCHW"), (torch.float32, "channels_last"), (torch.bfloat16, "NCHW"),
            (torch.bfloat16, "channels_last")]
ROUND_SECONDS = 0.02


def _layers(channels: int, dtype: torch.dtype) -> tuple[nn.Module, nn.Module]:
    """An SN and a BN layer with non-trivial parameters and running statistics, in eval mode."""
    g = torch.Generator().manual_seed(0)
    sn, bn = snn.SwitchNorm2d(channels), nn.BatchNorm2d(channels)
    with torch.no_grad():
        for layer in (sn, bn):
            layer.weight.copy_(torch.rand(layer.weight.shape, generator=g) + 0.5)
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=g))
            layer.running_mean.copy_(torch.randn(layer.running_mean.shape, generator=g))
            layer.running_var.copy_(torch.rand(layer.running_var.shape, generator=g) + 0.5)
        sn.mean_weight.copy_(torch.randn(3, generator=g))
        sn.var_weight.copy_(torch.randn(3, generator=g))
    return sn.eval().to(dtype), bn.eval().to(dtype)


def _time(call, rounds: int) -> list[float]:
    call()
    start = time.perf_counter()
    call()
    calls = max(1, round(ROUND_SECONDS / max(time.perf_counter() - start, 1e-7)))
    out = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        out.append((time.perf_counter() - start) / calls)
    return out


def measure(shape, dtype, layout, rounds: int) -> dict:
    """SN / BN times of the three comparisons at one shape, dtype and layout."""
    sn, bn = _layers(shape[1], dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g).to(dtype)
    shortcut = torch.randn(shape, generator=g).to(dtype)
    if layout == "channels_last":
        x, shortcut = (t.contiguous(memory_format=torch.channels_last) for t in (x, shortcut))
    relu = nn.ReLU(inplace=True)
    pairs = {
        "layer": (lambda: sn(x), lambda: bn(x)),
        "layer + relu": (lambda: snn.norm_relu(sn, relu, x), lambda: relu(bn(x))),
        "layer + shortcut + relu": (lambda: snn.norm_relu(sn, relu, x, shortcut), lambda: relu(bn(x) + shortcut)),
    }
    row = {}
    with torch.no_grad():
        for name, (sn_call, bn_call) in pairs.items():
            times = {"sn": [], "bn": []}
            for r in range(rounds):  # one round each, the order alternating
                order = (("sn", sn_call), ("bn", bn_call)) if r % 2 else (("bn", bn_call), ("sn", sn_call))
                for kind, call in order:
                    times[kind] += _time(call, 1)
            row[name] = (min(times["sn"]) / min(times["bn"]),
                         statistics.median(times["sn"]) / statistics.median(times["bn"]),
                         min(times["sn"]) * 1e6, min(times["bn"]) * 1e6)
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--csv", type=Path, default=RESULTS / "sn_layers_cpu.csv")
    parser.add_argument("--shapes", default="", help="only shapes whose label contains this text")
    args = parser.parse_args(argv)
    if any(os.environ.get(k) != v for k, v in TIMING_MALLOC.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **TIMING_MALLOC})
    print(f"# {environment(torch.device('cpu'))}; SN / BN, ratio of the fastest of {args.rounds} rounds (median)")
    rows = []
    for label, shape in (s for s in SHAPES if args.shapes in s[0]):
        for dtype, layout in SETTINGS:
            result = measure(shape, dtype, layout, args.rounds)
            precision = str(dtype).replace("torch.", "")
            for name, (best, median, sn_us, bn_us) in result.items():
                rows.append({"shape": label, "size": "x".join(map(str, shape)), "precision": precision,
                             "layout": layout, "comparison": name, "ratio_best": round(best, 3),
                             "ratio_median": round(median, 3), "sn_us": round(sn_us, 1), "bn_us": round(bn_us, 1)})
            cells = "  ".join(f"{name}: {best:.2f} ({median:.2f})" for name, (best, median, _, _) in result.items())
            print(f"{label:28s} {precision:8s} {layout:13s} {cells}", flush=True)
    write_csv(args.csv, rows)
    print(f"# wrote {args.csv}")


if __name__ == "__main__":
    sys.exit(main())
