"""The SN / BN grid: every model, batch, precision, layout and mode users run, as ratios measured in one process.

Cells: ResNet-50 v1 at batch 1, 8 and 32 (224x224), resnet20 (Fashion-MNIST, 1x28x28) at batch 8, 32 and 128,
ResNet-101 v2 and resnet50v1_ssn (Sparse SN, against ResNet-50's BN) at batch 8; each in eval (one forward without
gradients) and train (forward, backward, SGD step), float32 and bfloat16 autocast, NCHW and channels_last. The SN
and the BN model of a cell take turns (interleaved rounds after warm-up, the order alternating; a round of a small
model averages as many calls as take about 0.1 s; each model's cells run in a fresh process); the ratio of the
fastest rounds ("best": load only ever adds time) and of the medians are reported, and per model the peak training
memory (a fresh process per model, precision; NCHW) as SN / BN.

The models are the zoo's as users run them: the SN ResNets take each ReLU after a norm layer, and the residual sum
before a block's last ReLU, into the SN operator (`snzoo.nn.norm_relu`); the BN models run them as separate
operations, as torchvision's ResNets do. `sn_layers.py` times single layers with and without that epilogue.

    .venv/bin/python benchmarks/sn_speed.py --grid [--rounds 5] [--device cuda] [--compile] [--no-memory]
        [--cells resnet20] [--csv results/sn_grid_cpu.csv]

Writes the cells and the memory ratios as CSV (default results/sn_grid_{device}.csv and ..._memory.csv).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

import snzoo
from common import timed_train_step

RESULTS = Path(__file__).resolve().parent.parent / "results"


@dataclass(frozen=True)
class Model:
    """One row group of the grid: an SN model and its BN baseline at a batch and input size."""

    label: str
    sn: str
    bn: str
    batch: int
    size: int
    channels: int = 3


MODELS = [
    Model("ResNet-50, 1, 224", "resnet50v1_sn", "resnet50v1_bn", 1, 224),
    Model("ResNet-50, 8, 224", "resnet50v1_sn", "resnet50v1_bn", 8, 224),
    Model("ResNet-50, 32, 224", "resnet50v1_sn", "resnet50v1_bn", 32, 224),
    Model("resnet20, 8, 28", "resnet20_sn", "resnet20_bn", 8, 28, 1),
    Model("resnet20, 32, 28", "resnet20_sn", "resnet20_bn", 32, 28, 1),
    Model("resnet20, 128, 28", "resnet20_sn", "resnet20_bn", 128, 28, 1),
    Model("ResNet-101 v2, 8, 224", "resnet101v2_sn", "resnet101v2_bn", 8, 224),
    Model("ResNet-50 SSN, 8, 224", "resnet50v1_ssn", "resnet50v1_bn", 8, 224),
]
SETTINGS = [("float32", "NCHW"), ("float32", "channels_last"), ("bfloat16", "NCHW"), ("bfloat16", "channels_last")]
GPU_MODELS = [
    Model("ResNet-50, 32, 224", "resnet50v1_sn", "resnet50v1_bn", 32, 224),
    Model("ResNet-50, 128, 224", "resnet50v1_sn", "resnet50v1_bn", 128, 224),
]


class Runner:
    """A model with its batch and optimizer in one precision and layout; times an eval forward or a training step."""

    def __init__(self, name: str, model: Model, precision: str, layout: str, device: torch.device,
                 compile_model: bool = False) -> None:
        torch.manual_seed(0)
        net = snzoo.create_model(name).to(device)
        generator = torch.Generator().manual_seed(1)
        self.images = torch.randn(model.batch, model.channels, model.size, model.size, generator=generator).to(device)
        self.labels = torch.randint(0, 10, (model.batch,), generator=generator).to(device)
        if layout == "channels_last":
            net = net.to(memory_format=torch.channels_last)
            self.images = self.images.contiguous(memory_format=torch.channels_last)
        self.model = torch.compile(net) if compile_model else net
        self.net = net
        self.device = device
        self.dtype = torch.bfloat16 if precision == "bfloat16" else None
        self.optimizer = torch.optim.SGD(net.parameters(), lr=1e-4, momentum=0.9)
        self.loss = nn.CrossEntropyLoss()

    def _autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def eval_forward(self) -> float:
        self.net.eval()
        with torch.no_grad(), self._autocast():
            self._sync()
            start = time.perf_counter()
            self.model(self.images)
            self._sync()
        return time.perf_counter() - start

    def train_step(self) -> float:
        self.net.train()
        return timed_train_step(self.model, self.images, self.labels, self.optimizer, self.loss, self._autocast,
                                self._sync)


ROUND_SECONDS = 0.1


def _step(runner: Runner, mode: str) -> float:
    return runner.train_step() if mode == "train" else runner.eval_forward()


def time_cell(model: Model, precision: str, layout: str, rounds: int, warmup: int, device: torch.device,
              compile_model: bool = False) -> list[dict]:
    """The eval and train rows of one cell: SN and BN interleaved, best-of and median ratios."""
    runners = {kind: Runner(getattr(model, kind), model, precision, layout, device, compile_model)
               for kind in ("bn", "sn")}
    rows = []
    for mode in ("eval", "train"):
        times = {"bn": [], "sn": []}
        warm = {kind: [_step(runner, mode) for _ in range(warmup)] for kind, runner in runners.items()}
        # A round is one call on big models and as many calls as fill about ROUND_SECONDS on small ones (resnet20's
        # forward takes a few milliseconds, in which this machine's noise is as large as the difference measured);
        # both models of a cell make the same number of calls.
        calls = max(1, round(ROUND_SECONDS / max(min(warm["bn"] or [ROUND_SECONDS]), 1e-6)))
        for r in range(rounds):
            order = ("bn", "sn") if r % 2 == 0 else ("sn", "bn")
            for kind in order:
                times[kind].append(sum(_step(runners[kind], mode) for _ in range(calls)) / calls)
        rows.append({
            "model": model.label, "sn_model": model.sn, "bn_model": model.bn, "batch": model.batch,
            "size": model.size, "precision": precision, "layout": layout, "mode": mode,
            "bn_ms_best": 1000 * min(times["bn"]), "sn_ms_best": 1000 * min(times["sn"]),
            "ratio_best": min(times["sn"]) / min(times["bn"]),
            "ratio_median": statistics.median(times["sn"]) / statistics.median(times["bn"]),
        })
    del runners
    gc.collect()
    return rows


def _model_spec(model: Model) -> dict:
    return {"model": MODELS.index(model) if model in MODELS else -1,
            "gpu_model": GPU_MODELS.index(model) if model in GPU_MODELS else -1}


def _model_of(spec: dict) -> Model:
    return MODELS[spec["model"]] if spec["model"] >= 0 else GPU_MODELS[spec["gpu_model"]]


def time_model(model: Model, args: argparse.Namespace) -> Iterator[dict]:
    """The rows of one model (every precision and layout), timed in a fresh process: what one model's runs leave in
    the process (a heap grown to ResNet-50's activations at batch 32, the allocator's and oneDNN's caches) must not
    weigh on the next model's, whose users would not have run those first. The two models of a cell still share one
    process and take turns."""
    spec = dict(_model_spec(model), rounds=args.rounds, warmup=args.warmup, device=args.device, compile=args.compile)
    command = [sys.executable, str(Path(__file__).resolve().parent / "sn_speed.py"), "--threads",
               str(torch.get_num_threads()), "--grid-row-probe", json.dumps(spec)]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as child:
        for line in child.stdout:
            yield json.loads(line)
    if child.returncode != 0:
        raise RuntimeError(f"timing {model.label} failed (exit {child.returncode})")


def run_row_probe(spec: str) -> None:
    """The body of the fresh process `time_model` starts: one JSON line per row."""
    args = json.loads(spec)
    for precision, layout in SETTINGS:
        for row in time_cell(_model_of(args), precision, layout, args["rounds"], args["warmup"],
                             torch.device(args["device"]), args["compile"]):
            print(json.dumps(row), flush=True)


# ---------------------------------------------------------------------------------------------- memory
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_probe(name: str, model: Model, precision: str, device: torch.device) -> int:
    """Bytes by which one training step raises the peak over the memory after building and one eval forward."""
    runner = Runner(name, model, precision, "NCHW", device)
    runner.eval_forward()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        runner.train_step()
        return torch.cuda.max_memory_allocated(device) - base
    base = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak RSS
    runner.train_step()
    return (_status_kib("VmHWM") - base) * 1024


def measure_memory(name: str, model: Model, precision: str, device: str) -> int:
    """`memory_probe` in a fresh process (glibc's mmap threshold pinned, so that freed tensors leave the RSS)."""
    command = [sys.executable, str(Path(__file__).resolve().parent / "sn_speed.py"), "--grid-memory-probe",
               json.dumps(dict(_model_spec(model), name=name, precision=precision, device=device))]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"memory probe of {name} failed:\n{done.stderr}")
    return int(done.stdout.strip().splitlines()[-1])


def run_memory_probe(spec: str) -> None:
    """The body of the fresh process `measure_memory` starts: prints the bytes."""
    args = json.loads(spec)
    print(memory_probe(args["name"], _model_of(args), args["precision"], torch.device(args["device"])))


# ---------------------------------------------------------------------------------------------- report
def environment(device: torch.device) -> str:
    from sn_speed import available_cores, cpu_model

    hardware = f"{cpu_model()} ({available_cores()} cores)"
    if device.type == "cuda":
        hardware += f", {torch.cuda.get_device_name(device)}"
    from snzoo.nn import cpu_kernels

    kernel = cpu_kernels.active() if device.type == "cpu" else os.environ.get("SNZOO_TRITON") == "1"
    what = "snzoo CPU kernel" if device.type == "cpu" else "Triton passes"
    return (f"torch {torch.__version__}, {torch.get_num_threads()} threads, {hardware}; {what} "
            f"{'on' if kernel else 'off'}; {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")


def summary(rows: list[dict], target: float = 1.10) -> list[str]:
    best = [row["ratio_best"] for row in rows]
    misses = [row for row in rows if row["ratio_best"] > target]
    return [
        f"# {len(rows)} cells: best-of-rounds SN / BN median {statistics.median(best):.3f}, "
        f"max {max(best):.3f}, min {min(best):.3f}; {len(misses)} cells above {target:.2f}",
        *(f"#   above {target:.2f}: {r['model']}, {r['precision']} {r['layout']} {r['mode']}: {r['ratio_best']:.2f}"
          for r in misses),
    ]


def table(rows: list[dict]) -> list[str]:
    """One line per model: eval / train best-of ratio for each precision and layout."""
    lines = ["| model, batch, size | " + " | ".join(f"{p} {l} eval / train" for p, l in SETTINGS) + " |",
             "|---" * (len(SETTINGS) + 1) + "|"]
    for label in dict.fromkeys(row["model"] for row in rows):
        cells = []
        for precision, layout in SETTINGS:
            found = {r["mode"]: r["ratio_best"] for r in rows
                     if r["model"] == label and r["precision"] == precision and r["layout"] == layout}
            cells.append(" / ".join(f"{found[m]:.2f}" if m in found else "-" for m in ("eval", "train")))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: f"{v:.4f}" if isinstance(v, float) else v for k, v in row.items()})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per cell (--grid)")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models (--grid)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes (--grid)")
    parser.add_argument("--cells", default="", help="only models whose label contains this text (--grid)")
    parser.add_argument("--csv", help="where the grid's CSV goes (default results/sn_grid_{device}.csv)")
    parser.add_argument("--system-malloc", action="store_true",
                        help="time with glibc's default malloc settings (--grid on the CPU)")
    parser.add_argument("--grid-memory-probe", help=argparse.SUPPRESS)
    parser.add_argument("--grid-row-probe", help=argparse.SUPPRESS)


# The timing process keeps freed memory in glibc's heap: every fresh big tensor would otherwise be new pages from the
# kernel, whose faults took a third of resnet20's forward at batch 128 on this project's VM and varied by +-20%
# between runs. Both models of a cell pay them alike, so they pull ratios towards 1 and hide SN's cost; --system-malloc
# measures with glibc's defaults. (The memory probes pin their own settings.)
TIMING_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(2**30), "MALLOC_TRIM_THRESHOLD_": str(2**40)}


def _timing_allocator(args: argparse.Namespace) -> str:
    """Re-run this process with TIMING_MALLOC on the CPU (unless --system-malloc); what the header says of it."""
    if args.device != "cpu" or args.system_malloc:
        return "glibc malloc defaults"
    if any(os.environ.get(k) != v for k, v in TIMING_MALLOC.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **TIMING_MALLOC})
    return "glibc malloc without mmap / trim of freed memory (--system-malloc: defaults)"


def main(args: argparse.Namespace) -> None:
    """Run the grid for `benchmarks/sn_speed.py --grid`."""
    allocator = _timing_allocator(args)
    device = torch.device(args.device)
    models = GPU_MODELS if device.type == "cuda" else MODELS
    models = [m for m in models if args.cells.lower() in m.label.lower()]
    print(f"# SN / BN grid on {args.device}{' (torch.compile)' if args.compile else ''}: {environment(device)}")
    print(f"# {args.rounds} interleaved rounds per cell after {args.warmup} warm-up; ratios of the fastest rounds; "
          f"{allocator}")
    rows = []
    for model in models:
        for row in time_model(model, args):
            rows.append(row)
            precision, layout = row["precision"], row["layout"]
            print(f"{row['model']:<24}{precision:>9} {layout:<14}{row['mode']:<6}"
                  f"BN {row['bn_ms_best']:9.1f} ms  SN {row['sn_ms_best']:9.1f} ms  "
                  f"{row['ratio_best']:.3f} (median {row['ratio_median']:.3f})", flush=True)
    memory = []
    if not args.no_memory:
        for model in models:
            for precision in ("float32", "bfloat16"):
                bn = measure_memory(model.bn, model, precision, args.device)
                sn = measure_memory(model.sn, model, precision, args.device)
                memory.append({"model": model.label, "precision": precision, "bn_mib": bn / 2**20,
                               "sn_mib": sn / 2**20, "ratio": sn / bn})
                print(f"memory {model.label:<24}{precision:>9}  BN {bn / 2**20:8.1f} MiB  SN {sn / 2**20:8.1f} MiB  "
                      f"{sn / bn:.3f}", flush=True)
    print("\n".join(table(rows) + summary(rows)))
    if memory:
        worst = max(memory, key=lambda m: m["ratio"])
        print(f"# peak training memory SN / BN: max {worst['ratio']:.3f} ({worst['model']}, {worst['precision']})")
    suffix = "_compile" if args.compile else ""
    path = Path(args.csv) if args.csv else RESULTS / f"sn_grid_{device.type}{suffix}.csv"
    write_csv(path, rows)
    write_csv(path.with_name(path.stem + "_memory.csv"), memory)
    print(f"# wrote {path}" + (f" and {path.with_name(path.stem + '_memory.csv')}" if memory else ""))
