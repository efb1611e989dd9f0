"""The evaluation engine: a model and a data set in, top-1 / top-5 and throughput out."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from snzoo._io import NoProgressBar
from snzoo._torch_utils import autocast
from snzoo.data import BadImageError, DataError, EvalBatch, collate_skip_bad


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
    real: Optional[dict] = None  # ImageNet-ReaL over images with a label set: n, correct1, correct5, top1, top5
    classes_evaluated: Optional[int] = None  # the classes the logits were restricted to, when they were

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return asdict(self)


def default_workers() -> int:
    """DataLoader workers by default: the CPU count (what this process may use)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


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


def _unpack(batch) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], list]:
    if isinstance(batch, EvalBatch):
        return batch.images, batch.labels, batch.indices, [s._asdict() for s in batch.skipped]
    return batch[0], batch[1], (batch[2] if len(batch) > 2 else None), []


class _Tally:
    """Top-1 / top-5 counts (and per class, and against ImageNet-ReaL label sets) of the batches seen so far.

    class_subset restricts the logits to those classes before top-k (ImageNet-R and -A score 200 of the 1000);
    label_sets[i] holds the ReaL labels of dataset sample i (empty: the image is left out of the ReaL count).
    """

    def __init__(self, per_class: bool, class_subset: Optional[Sequence[int]],
                 label_sets: Optional[Sequence[Sequence[int]]]) -> None:
        self.per_class, self.label_sets = per_class, label_sets
        self.subset = None if class_subset is None else torch.as_tensor(list(class_subset), dtype=torch.long)
        self.n = self.correct1 = self.correct5 = 0
        self.real_n = self.real1 = self.real5 = 0
        self.class_total: Optional[torch.Tensor] = None
        self.class_correct: Optional[torch.Tensor] = None

    def add(self, logits: torch.Tensor, labels: torch.Tensor, indices: Optional[torch.Tensor]) -> None:
        size = logits.shape[1]
        if self.subset is not None:
            subset = self.subset.to(logits.device)
            if not bool(torch.isin(labels, subset).all()):
                outside = int(labels[~torch.isin(labels, subset)][0])
                raise DataError(f"an image of class {outside} is outside the {len(subset)} classes the logits are "
                                "restricted to; evaluate that data without the class restriction")
            logits = logits[:, subset]
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        if self.subset is not None:
            top = subset[top]  # back to the model's class indices
        hits = top.eq(labels[:, None])
        self.correct1 += int(hits[:, 0].sum())
        self.correct5 += int(hits.any(dim=1).sum())
        self.n += labels.numel()
        if self.per_class:
            if self.class_total is None:
                self.class_total = torch.zeros(size, dtype=torch.long)
                self.class_correct = torch.zeros(size, dtype=torch.long)
            self.class_total += torch.bincount(labels.cpu(), minlength=size)
            self.class_correct += torch.bincount(labels[hits[:, 0]].cpu(), minlength=size)
        if self.label_sets is not None:
            if indices is None:
                raise DataError("ImageNet-ReaL needs each image's dataset index; pass a dataset, not bare batches")
            for row, index in zip(top.tolist(), indices.tolist()):
                real = self.label_sets[index]
                if real:
                    self.real_n += 1
                    self.real1 += row[0] in real
                    self.real5 += any(c in real for c in row[:5])


def _bad_image_line(exc: BaseException) -> str:
    # DataLoader workers re-raise with the worker's traceback as the message; its last line is ours.
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else type(exc).__name__
    return last.split(": ", 1)[1] if last.startswith(("BadImageError:", "snzoo.errors.BadImageError:")) else last


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
    class_subset: Optional[Sequence[int]] = None,
    label_sets: Optional[Sequence[Sequence[int]]] = None,
    normalize: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> EvalResult:
    """Top-1 / top-5 accuracy (percent) of `model` over `data` in eval mode, with throughput.

    data: a Dataset (items (image, label, ...)) or any iterable of batches (a DataLoader). With a Dataset,
    `limit` keeps the first N samples. amp: False, True / "bfloat16", or "float16" autocast (SN statistics stay
    float32). per_class adds each class's top-1 and sample count. Unreadable images skipped by a skip-bad
    dataset are listed in `skipped`. class_subset restricts the logits to those class indices before top-k
    (ImageNet-R, ImageNet-A); label_sets (indexed like the dataset) adds ImageNet-ReaL accuracy to `real`.
    normalize turns each batch into the model's input on the device (`snzoo.data.BatchNormalize` for datasets
    that give uint8 images, as `evaluate_model`'s do).
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
    tally = _Tally(per_class, class_subset, label_sets)
    skipped: list[dict] = []
    start = time.perf_counter()
    try:
        with torch.inference_mode(), autocast(device, amp):
            for batch in loader:
                images, labels, indices, bad = _unpack(batch)
                skipped.extend(bad)
                if labels.numel() == 0:
                    continue
                images = images.to(device, non_blocking=True, memory_format=memory_format)
                if normalize is not None:
                    images = normalize(images)
                labels = labels.to(device, non_blocking=True)
                tally.add(model(images).float(), labels, indices)
                bar.update(labels.numel())
                bar.set_postfix(top1=f"{100.0 * tally.correct1 / tally.n:.2f}")
                if limit is not None and not isinstance(data, Dataset) and tally.n >= limit:
                    break
    except BadImageError as exc:
        raise BadImageError(_bad_image_line(exc)) from None
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    n = tally.n
    if n == 0:
        raise BadImageError("no image could be evaluated: every image was skipped as unreadable")
    result = EvalResult(
        model=name,
        top1=100.0 * tally.correct1 / n,
        top5=100.0 * tally.correct5 / n,
        n=n,
        correct1=tally.correct1,
        correct5=tally.correct5,
        seconds=seconds,
        images_per_s=n / seconds if seconds > 0 else float("inf"),
        skipped=skipped,
        limit=limit,
        classes_evaluated=None if class_subset is None else len(tally.subset),
    )
    if label_sets is not None:
        result.real = {"n": tally.real_n, "correct1": tally.real1, "correct5": tally.real5,
                       "top1": 100.0 * tally.real1 / max(tally.real_n, 1),
                       "top5": 100.0 * tally.real5 / max(tally.real_n, 1)}
    if per_class and tally.class_total is not None:
        total, correct = tally.class_total, tally.class_correct
        names = class_names or [str(i) for i in range(len(total))]
        result.per_class = {
            names[i]: {"n": int(total[i]), "top1": 100.0 * int(correct[i]) / int(total[i])}
            for i in range(len(total)) if total[i] > 0
        }
    if num_classes is not None:
        result.config["num_classes"] = num_classes
    result.config.update(batch_size=batch_size, device=str(device), amp=amp, channels_last=channels_last)
    return result


def _progress_bar(show: bool, loader):
    if not show:
        return NoProgressBar()
    from tqdm import tqdm

    total = len(loader.dataset) if hasattr(loader, "dataset") else None
    return tqdm(total=total, unit="img", desc="eval", dynamic_ncols=True)
