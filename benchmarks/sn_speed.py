"""Speed and memory of Switchable Normalization, as ratios to BatchNorm measured in the same run.

One ResNet (v1, depth 50 by default) with each norm, random weights and random images:

- BN, GN: torch's BatchNorm2d and GroupNorm, the baselines;
- straightforward SN: the anchor of benchmarks/straightforward_sn.py, SN written the way the equations read;
- snzoo SN (reference / fused): snzoo's SwitchNorm2d with each implementation of snzoo.nn.functional
  (the rows that implementation switching does not offer are left out, and said so); on the CPU the fused
  row twice, its eval on snzoo's compiled kernel and on PyTorch ops (snzoo.nn.cpu_kernels.use_kernel).

Times are the median over --repeats rounds in which the variants take turns (round-robin, the start rotating
every round), after warm-up, because a shared machine drifts; read the ratios, not the milliseconds. Peak
training memory is measured for each variant in a fresh process (this script, re-run with a hidden flag).

    .venv/bin/python benchmarks/sn_speed.py [--batch 8] [--size 224] [--arch-depth 50] [--threads N]
        [--repeats 5] [--warmup 2] [--device cuda --amp bf16] [--json FILE]
    .venv/bin/python benchmarks/sn_speed.py --grid [--device cuda] [--compile]   # every cell: benchmarks/sn_grid.py
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

import snzoo
from snzoo.nn import functional as sn_functional

import sn_grid
from common import cpu_model, timed_train_step
from straightforward_sn import swap_in_straightforward

AMP = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
MIB = 1024 * 1024


@dataclass(frozen=True)
class Variant:
    """One row of the table: which norm, and for snzoo's SN which implementation."""

    key: str
    label: str
    norm: str
    straightforward: bool = False
    implementation: Optional[str] = None
    kernel: bool = True  # snzoo's CPU kernel for eval-mode SN, where it is built


def variants(device: str = "cpu") -> tuple[list[Variant], list[str]]:
    """The rows this snzoo offers, and a note for each snzoo SN row it cannot run."""
    rows = [Variant("bn", "BN (torch BatchNorm2d)", "bn"), Variant("gn", "GN (torch GroupNorm)", "gn"),
            Variant("anchor", "straightforward SN (anchor)", "sn", straightforward=True)]
    notes = []
    if not hasattr(sn_functional, "use_implementation"):
        rows.append(Variant("sn", "snzoo SN", "sn"))
        notes.append("snzoo.nn.functional has no use_implementation: one snzoo SN row, reference and fused not told apart")
        return rows, notes
    for name in ("reference", "fused"):
        try:
            with implementation(name):
                pass
        except Exception as exc:  # an implementation this machine or build lacks: leave its row out
            notes.append(f"snzoo SN ({name}) left out: {exc}")
            continue
        if name == "fused" and device == "cpu" and _kernel_built():
            rows.append(Variant("sn_fused", "snzoo SN (fused, kernel)", "sn", implementation=name))
            rows.append(Variant("sn_fused_ops", "snzoo SN (fused, torch ops)", "sn", implementation=name, kernel=False))
            continue
        rows.append(Variant(f"sn_{name}", f"snzoo SN ({name})", "sn", implementation=name))
    return rows, notes


def _kernel_built() -> bool:
    try:
        from snzoo.nn import cpu_kernels
    except ImportError:  # a snzoo without the kernel
        return False
    return cpu_kernels.available()


@contextlib.contextmanager
def implementation(name: Optional[str], kernel: bool = True):
    """Run snzoo's SN with implementation `name` inside the block (None: leave it as it is), with or without
    snzoo's CPU kernel."""
    if name is None:
        yield
        return
    with sn_functional.use_implementation(name), contextlib.ExitStack() as stack:
        if not kernel:
            from snzoo.nn import cpu_kernels

            stack.enter_context(cpu_kernels.use_kernel(False))
        yield


class Runner:
    """A built model with its batch, labels and optimizer; times one eval forward or one training step."""

    def __init__(self, variant: Variant, args: argparse.Namespace) -> None:
        self.variant = variant
        self.device = torch.device(args.device)
        self.amp = AMP.get(args.amp) if args.amp else None
        torch.manual_seed(0)  # every variant starts from the same convolution weights
        model = snzoo.create_model(f"resnet{args.arch_depth}v1_{variant.norm}")
        if variant.straightforward:
            model = swap_in_straightforward(model)
        self.model = model.to(self.device)
        generator = torch.Generator().manual_seed(1)
        self.images = torch.randn(args.batch, 3, args.size, args.size, generator=generator).to(self.device)
        self.labels = torch.randint(0, 1000, (args.batch,), generator=generator).to(self.device)
        # A small learning rate: the step does its full arithmetic while many repeats leave the weights sane.
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-4, momentum=0.9)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp is torch.float16 else None
        self.loss_fn = nn.CrossEntropyLoss()

    def _autocast(self):
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def eval_forward(self) -> float:
        """Seconds of one forward in eval mode without autograd."""
        self.model.eval()
        with implementation(self.variant.implementation, self.variant.kernel), torch.no_grad(), self._autocast():
            self._sync()
            start = time.perf_counter()
            self.model(self.images)
            self._sync()
            return time.perf_counter() - start

    def train_step(self) -> float:
        """Seconds of one forward + backward + SGD step in training mode."""
        self.model.train()
        with implementation(self.variant.implementation, self.variant.kernel):
            return timed_train_step(self.model, self.images, self.labels, self.optimizer, self.loss_fn,
                                    self._autocast, self._sync, self.scaler)


# ---------------------------------------------------------------------------------------------- memory
def _proc_status_kib(field: str) -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    # Writing 5 to clear_refs resets VmHWM (Linux >= 4.0), so the peak seen afterwards belongs to the step.
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def memory_probe(variant: Variant, args: argparse.Namespace) -> dict:
    """Increase of peak memory during one training step over the memory after build + one eval forward."""
    runner = Runner(variant, args)
    runner.eval_forward()
    gc.collect()
    if runner.device.type == "cuda":
        torch.cuda.synchronize(runner.device)
        base = torch.cuda.memory_allocated(runner.device)
        torch.cuda.reset_peak_memory_stats(runner.device)
        runner.train_step()
        peak = torch.cuda.max_memory_allocated(runner.device)
        method = ("torch.cuda.max_memory_allocated during one training step minus memory_allocated after "
                  "building the model and one eval forward; each variant in a fresh process")
        return {"bytes": peak - base, "method": method}
    base_kib = _proc_status_kib("VmRSS")
    if base_kib is not None and _reset_peak_rss():
        runner.train_step()
        peak_kib = _proc_status_kib("VmHWM")
        method = ("peak RSS (VmHWM, reset through /proc/self/clear_refs) during one training step minus RSS after "
                  "building the model and one eval forward; each variant in a fresh process, glibc mmap threshold "
                  "pinned so freed tensors leave RSS")
    else:
        # Without a resettable peak, ru_maxrss holds the peak since the process started.
        base_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        runner.train_step()
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if sys.platform == "darwin":  # bytes there, KiB on Linux
            base_kib, peak_kib = base_kib // 1024, peak_kib // 1024
        method = ("increase of ru_maxrss (peak RSS since process start) over one training step after building "
                  "the model and one eval forward; each variant in a fresh process")
    return {"bytes": (peak_kib - base_kib) * 1024, "method": method}


def measure_memory(variant: Variant, args: argparse.Namespace) -> dict:
    """Run memory_probe for one variant in a fresh process of this script."""
    command = [sys.executable, str(Path(__file__).resolve()), "--memory-probe", variant.key,
               "--batch", str(args.batch), "--size", str(args.size), "--arch-depth", str(args.arch_depth),
               "--threads", str(args.threads), "--device", args.device]
    if args.amp:
        command += ["--amp", args.amp]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"memory probe of {variant.label} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------- report
def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def header(args: argparse.Namespace, memory_method: str) -> list[str]:
    """The lines above the table: what ran, where, when."""
    hardware = f"{cpu_model()} ({available_cores()} cores available)"
    if args.device.startswith("cuda"):
        hardware += f", {torch.cuda.get_device_name(torch.device(args.device))}"
    try:
        load = " load average %.2f %.2f %.2f at start," % os.getloadavg()
    except OSError:
        load = ""
    impl = sn_functional.get_implementation() if hasattr(sn_functional, "get_implementation") else "n/a"
    return [
        f"# SN speed: resnet{args.arch_depth}v1, batch {args.batch}, 3x{args.size}x{args.size}, "
        f"{args.amp or 'float32'}, {args.device}; median of {args.repeats} round-robin rounds after {args.warmup} warm-up",
        f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {hardware}, python {platform.python_version()}",
        f"# {datetime.datetime.now().astimezone().isoformat(timespec='seconds')},{load} snzoo {snzoo.__version__}, "
        f"default SN implementation {impl}",
        "# eval: one forward in eval mode without grad; train: forward + backward + SGD (momentum) step",
        f"# memory: {memory_method}",
        "# ratios are to BN in this same run; milliseconds vary with the machine's load, the ratios less so; "
        "'best' compares the fastest round of each variant (load only ever adds time)",
    ]


def table(rows: list[dict]) -> list[str]:
    """The fixed-width table of the rows."""
    lines = [f"{'variant':<30}{'eval ms':>10}{'x BN':>8}{'best':>7}{'train ms':>11}{'x BN':>8}{'best':>7}"
             f"{'train MiB':>11}{'x BN':>8}"]
    for row in rows:
        lines.append(f"{row['label']:<30}{row['eval_ms']:>10.1f}{row['eval_ratio']:>7.2f}x{row['eval_best_ratio']:>6.2f}x"
                     f"{row['train_ms']:>11.1f}{row['train_ratio']:>7.2f}x{row['train_best_ratio']:>6.2f}x"
                     f"{row['memory_mib']:>11.1f}{row['memory_ratio']:>7.2f}x")
    return lines


def against_anchor(rows: list[dict]) -> list[str]:
    """snzoo's SN rows as ratios to the straightforward SN."""
    anchor = next(row for row in rows if row["key"] == "anchor")
    return [f"# {row['label']} / straightforward SN: eval {row['eval_ms'] / anchor['eval_ms']:.2f}x, "
            f"train {row['train_ms'] / anchor['train_ms']:.2f}x, memory {row['memory_mib'] / anchor['memory_mib']:.2f}x"
            for row in rows if row["key"].startswith("sn")]


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--arch-depth", type=int, default=50, choices=[18, 34, 50, 101, 152])
    parser.add_argument("--threads", type=int, default=available_cores(), help="torch threads (default: the cores)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds; the median is reported")
    parser.add_argument("--warmup", type=int, default=2, help="untimed eval forwards and train steps per variant")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--amp", choices=sorted(AMP), help="autocast dtype, e.g. bf16 on a GPU")
    parser.add_argument("--json", metavar="FILE", help="also write the table as JSON to FILE")
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)  # internal: one variant's memory, as JSON
    parser.add_argument("--grid", action="store_true", help="the whole SN / BN grid (benchmarks/sn_grid.py)")
    sn_grid.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA GPU here")
    if min(args.batch, args.size, args.threads, args.repeats) < 1 or args.warmup < 0:
        parser.error("--batch, --size, --threads and --repeats must be >= 1, --warmup >= 0")
    return args


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.grid_memory_probe:
        sn_grid.run_memory_probe(args.grid_memory_probe)
        return
    if args.grid_row_probe:
        sn_grid.run_row_probe(args.grid_row_probe)
        return
    if args.grid:
        sn_grid.main(args)
        return
    rows_to_run, notes = variants(args.device)
    if args.memory_probe:
        variant = next(v for v in rows_to_run if v.key == args.memory_probe)
        print(json.dumps(memory_probe(variant, args)))
        return

    # Memory first, one fresh process at a time, while this process holds no models.
    memory = {v.key: measure_memory(v, args) for v in rows_to_run}
    runners = [Runner(v, args) for v in rows_to_run]
    for runner in runners:
        for _ in range(args.warmup):
            runner.eval_forward()
            runner.train_step()
    eval_s = {r.variant.key: [] for r in runners}
    train_s = {r.variant.key: [] for r in runners}
    for round_ in range(args.repeats):
        shift = round_ % len(runners)
        for runner in runners[shift:] + runners[:shift]:
            eval_s[runner.variant.key].append(runner.eval_forward())
            train_s[runner.variant.key].append(runner.train_step())

    rows = []
    for v in rows_to_run:
        rows.append({
            "key": v.key, "label": v.label, "implementation": v.implementation,
            "eval_ms": 1000 * statistics.median(eval_s[v.key]),
            "train_ms": 1000 * statistics.median(train_s[v.key]),
            "memory_mib": memory[v.key]["bytes"] / MIB,
            "eval_samples_ms": [1000 * s for s in eval_s[v.key]],
            "train_samples_ms": [1000 * s for s in train_s[v.key]],
        })
    bn = rows[0]
    for row in rows:
        for phase in ("eval", "train"):
            row[f"{phase}_ratio"] = row[f"{phase}_ms"] / bn[f"{phase}_ms"]
            row[f"{phase}_best_ratio"] = min(row[f"{phase}_samples_ms"]) / min(bn[f"{phase}_samples_ms"])
        row["memory_ratio"] = row["memory_mib"] / bn["memory_mib"] if bn["memory_mib"] > 0 else float("nan")

    memory_method = memory["bn"]["method"]
    lines = header(args, memory_method) + table(rows) + against_anchor(rows) + [f"# {note}" for note in notes]
    print("\n".join(lines))
    if args.json:
        report = {
            "settings": {k: getattr(args, k) for k in ("batch", "size", "arch_depth", "threads", "repeats", "warmup",
                                                       "device", "amp")},
            "torch": torch.__version__, "threads": torch.get_num_threads(), "hardware": cpu_model(),
            "cores": available_cores(), "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "memory_method": memory_method, "rows": rows, "notes": notes,
        }
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
