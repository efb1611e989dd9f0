"""The evaluation engine: a model and a data set in, top-1 / top-5 and throughput out."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Iterable, Optional, Union

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from snzoo.data import BadImageError, EvalBatch, collate_skip_bad
from snzoo.errors import DeviceError


@dataclass
class EvalResult:
    """What an evaluation measured; `config` records the data and runtime settings actually used."""

    model: str
    top1: float
    top5: float
    n: int
    correct1: int
    correct5: int
    seconds: float
    images_per_s: float
    skipped: list[dict] = field(default_factory=list)
    per_class: Optional[dict[str, dict]] = None
    config: dict = field(default_factory=dict)
    published: Optional[dict] = None
    param_count: Optional[int] = None
    checkpoint_sha256: Optional[str] = None
    limit: Optional[int] = None

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return asdict(self)


def default_workers() -> int:
    """DataLoader workers by default: the CPU count (what this process may use)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def check_device(device: Union[str, torch.device]) -> torch.device:
    """The torch.device for `device`, or DeviceError when it is no device type or a GPU that is not here."""
    try:
        torch_device = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if torch_device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {str(device)!r} asked for, but torch sees no CUDA GPU here; use --device cpu")
        if torch_device.index is not None and torch_device.index >= torch.cuda.device_count():
            raise DeviceError(f"device {str(device)!r} asked for, but this machine has {torch.cuda.device_count()} "
                              "CUDA GPU(s); use cuda:0 or a lower index")
    return torch_device


def make_loader(dataset: Dataset, batch_size: int = 64, workers: Optional[int] = None, device: str = "cpu",
                limit: Optional[int] = None) -> DataLoader:
    """A DataLoader for evaluation: in order, worker processes kept alive, pinned memory for a GPU."""
    if limit is not None:
        dataset = Subset(dataset, range(min(limit, len(dataset))))
    workers = default_workers() if workers is None else workers
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=torch.device(device).type == "cuda",
        collate_fn=collate_skip_bad,
        generator=torch.Generator().manual_seed(0),  # leave the global RNG of a training run untouched
    )


def _autocast(device: torch.device, amp: Union[bool, str]):
    if not amp:
        return contextlib.nullcontext()
    dtype = torch.float16 if amp == "float16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _unpack(batch) -> tuple[torch.Tensor, torch.Tensor, list]:
    if isinstance(batch, EvalBatch):
        return batch.images, batch.labels, [s._asdict() for s in batch.skipped]
    return batch[0], batch[1], []


def _bad_image_line(exc: BaseException) -> str:
    # DataLoader workers re-raise with the worker's traceback as the message; its last line is ours.
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else type(exc).__name__
    return last.split(": ", 1)[1] if last.startswith(("BadImageError:", "snzoo.data.datasets.BadImageError:")) else last


def evaluate(
    model: nn.Module,
    data: Union[Dataset, Iterable],
    *,
    batch_size: int = 64,
    workers: Optional[int] = None,
    device: Union[str, torch.device] = "cpu",
    amp: Union[bool, str] = False,
    channels_last: bool = False,
    limit: Optional[int] = None,
    per_class: bool = False,
    class_names: Optional[list[str]] = None,
    progress: Optional[bool] = None,
    name: str = "model",
) -> EvalResult:
    """Top-1 / top-5 accuracy (percent) of `model` over `data` in eval mode, with throughput.

    data: a Dataset (items (image, label, ...)) or any iterable of batches (a DataLoader). With a Dataset,
    `limit` keeps the first N samples. amp: False, True / "bfloat16", or "float16" autocast (SN statistics stay
    float32). per_class adds each class's top-1 and sample count. Unreadable images skipped by a skip-bad
    dataset are listed in `skipped`.
    """
    device = torch.device(device)
    loader = make_loader(data, batch_size, workers, device.type, limit) if isinstance(data, Dataset) else data
    model = model.eval().to(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    num_classes = getattr(model, "num_classes", None)
    show = progress if progress is not None else bool(sys.stderr is not None and sys.stderr.isatty())
    bar = _progress_bar(show, loader)
    n = correct1 = correct5 = 0
    class_total = class_correct = None
    skipped: list[dict] = []
    start = time.perf_counter()
    try:
        with torch.inference_mode(), _autocast(device, amp):
            for batch in loader:
                images, labels, bad = _unpack(batch)
                skipped.extend(bad)
                if labels.numel() == 0:
                    continue
                images = images.to(device, non_blocking=True, memory_format=memory_format)
                labels = labels.to(device, non_blocking=True)
                logits = model(images).float()
                k = min(5, logits.shape[1])
                top = logits.topk(k, dim=1).indices
                hits = top.eq(labels[:, None])
                correct1 += int(hits[:, 0].sum())
                correct5 += int(hits.any(dim=1).sum())
                n += labels.numel()
                if per_class:
                    size = logits.shape[1]
                    if class_total is None:
                        class_total = torch.zeros(size, dtype=torch.long)
                        class_correct = torch.zeros(size, dtype=torch.long)
                    class_total += torch.bincount(labels.cpu(), minlength=size)
                    class_correct += torch.bincount(labels[hits[:, 0]].cpu(), minlength=size)
                bar.update(labels.numel())
                bar.set_postfix(top1=f"{100.0 * correct1 / n:.2f}")
                if limit is not None and not isinstance(data, Dataset) and n >= limit:
                    break
    except BadImageError as exc:
        raise BadImageError(_bad_image_line(exc)) from None
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    if n == 0:
        raise BadImageError("no image could be evaluated: every image was skipped as unreadable")
    result = EvalResult(
        model=name,
        top1=100.0 * correct1 / n,
        top5=100.0 * correct5 / n,
        n=n,
        correct1=correct1,
        correct5=correct5,
        seconds=seconds,
        images_per_s=n / seconds if seconds > 0 else float("inf"),
        skipped=skipped,
        limit=limit,
    )
    if per_class and class_total is not None:
        names = class_names or [str(i) for i in range(len(class_total))]
        result.per_class = {
            names[i]: {"n": int(class_total[i]), "top1": 100.0 * int(class_correct[i]) / int(class_total[i])}
            for i in range(len(class_total)) if class_total[i] > 0
        }
    if num_classes is not None:
        result.config["num_classes"] = num_classes
    result.config.update(batch_size=batch_size, device=str(device), amp=amp, channels_last=channels_last)
    return result


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def set_postfix(self, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(show: bool, loader):
    if not show:
        return _NoBar()
    from tqdm import tqdm

    total = len(loader.dataset) if hasattr(loader, "dataset") else None
    return tqdm(total=total, unit="img", desc="eval", dynamic_ncols=True)
