"""Throughput of a model: evaluation and training images per second on random data.

    from snzoo.tools.bench import benchmark_model
    benchmark_model("resnet50v1_sn", batch=8, size=224)

The numbers depend on the machine and on what else runs on it; compare models measured in the same process
(the scripts under benchmarks/ report such ratios) rather than numbers taken at different times.
"""

from __future__ import annotations

import copy
import time
from typing import Callable, Optional, Union

import torch
from torch import nn

from snzoo._factory import create_model
from snzoo._torch_utils import AMP_DTYPES, autocast, check_device, input_channels
from snzoo.errors import BenchmarkError, DeviceError
from snzoo.nn import cpu_kernels
from snzoo.nn.functional import get_implementation


def benchmark_model(
    name_or_model: Union[str, nn.Module],
    batch: int = 8,
    size: int = 224,
    device: str = "cpu",
    amp: Optional[str] = None,
    channels_last: bool = False,
    steps: int = 10,
    warmup: int = 3,
) -> dict:
    """Eval images/s (forward, no grad) and train images/s (forward + backward + SGD step) on random data.

    name_or_model: an architecture or zoo entry name, built with random weights (an entry's class count and
    norm settings), or a model, of which a copy is measured so the caller's weights stay as they were.
    amp: None, "bfloat16" or "float16" (autocast; float16 training uses a gradient scaler).
    Returns the throughputs, the milliseconds per batch, and the settings, thread count and torch version.
    """

    torch_device = _check_settings(batch, size, device, amp, steps, warmup)
    if isinstance(name_or_model, nn.Module):
        name = getattr(name_or_model, "architecture", type(name_or_model).__name__)
        model = copy.deepcopy(name_or_model)
    else:
        name = name_or_model
        model = create_model(name_or_model)
    in_chans = (input_channels(model) or 3)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(torch_device, memory_format=memory_format)
    generator = torch.Generator().manual_seed(0)  # leave the caller's global RNG untouched
    images = torch.randn(batch, in_chans, size, size, generator=generator)
    images = images.to(torch_device, memory_format=memory_format)
    mixed_precision = autocast(torch_device, amp)

    model.eval()
    with torch.no_grad(), mixed_precision:
        num_classes = model(images).shape[1]

        def eval_step() -> None:
            model(images)

        eval_s = _time(eval_step, torch_device, steps, warmup)

    labels = torch.randint(0, num_classes, (batch,), generator=generator).to(torch_device)
    # A small learning rate: the step does the full arithmetic while the weights stay in a sane range.
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    scaler = torch.amp.GradScaler(torch_device.type) if AMP_DTYPES.get(amp or "") is torch.float16 else None
    loss_fn = nn.CrossEntropyLoss()
    model.train()

    def train_step() -> None:
        training_step(model, images, labels, optimizer, loss_fn, lambda: autocast(torch_device, amp), scaler)

    train_s = _time(train_step, torch_device, steps, warmup)
    return {
        "model": name,
        "eval_images_per_s": batch * steps / eval_s,
        "train_images_per_s": batch * steps / train_s,
        "eval_ms_per_batch": 1000 * eval_s / steps,
        "train_ms_per_step": 1000 * train_s / steps,
        "batch": batch,
        "size": size,
        "in_chans": in_chans,
        "num_classes": num_classes,
        "device": str(torch_device),
        "amp": _amp_name(amp),
        "channels_last": channels_last,
        "steps": steps,
        "warmup": warmup,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "sn_implementation": get_implementation(),
        # eval-mode SN on the CPU: snzoo's compiled kernel, or PyTorch ops where it is not built / switched off
        "sn_cpu_kernel": torch_device.type == "cpu" and cpu_kernels.active(),
    }


def _check_settings(batch: int, size: int, device: str, amp: Optional[str], steps: int, warmup: int) -> torch.device:
    for label, value, least in (("batch", batch, 1), ("size", size, 1), ("steps", steps, 1), ("warmup", warmup, 0)):
        if not isinstance(value, int) or value < least:
            raise BenchmarkError(f"{label} must be an integer >= {least}, got {value!r}")
    if amp is not None and amp not in AMP_DTYPES:
        raise BenchmarkError(f"amp must be one of bfloat16, float16 (or none), got {amp!r}")
    try:
        torch_device = check_device(device)
    except DeviceError as exc:
        raise BenchmarkError(str(exc)) from None
    if torch_device.type not in ("cpu", "cuda"):
        raise BenchmarkError(f"device {device!r} is not supported by the benchmark; use cpu or cuda")
    return torch_device


def _amp_name(amp: Optional[str]) -> Optional[str]:
    return None if amp is None else str(AMP_DTYPES[amp]).replace("torch.", "")


def training_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, optimizer: torch.optim.Optimizer,
                  loss_fn: Callable, mixed_precision: Callable, scaler: Optional[torch.amp.GradScaler] = None) -> None:
    """One training step as the benchmarks time it: zero_grad, forward under `mixed_precision()`, backward and
    optimizer step (through the GradScaler when given)."""
    optimizer.zero_grad(set_to_none=True)
    with mixed_precision():
        loss = loss_fn(model(images), labels)
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()


def _time(step: Callable[[], None], device: torch.device, steps: int, warmup: int) -> float:
    """Seconds for `steps` calls of step after `warmup` untimed ones, with the GPU queue drained around them."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return time.perf_counter() - start


__all__ = ["benchmark_model", "training_step"]
