"""Segmentation evaluation: mIoU, pixel accuracy and per-class IoU from one confusion matrix over the data set."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from snzoo.errors import DataError
from snzoo.eval.engine import _progress_bar

__all__ = ["SegmentationResult", "confusion_matrix", "evaluate_segmentation", "segmentation_scores"]


@dataclass
class SegmentationResult:
    """Segmentation scores in percent. ``per_class_iou[c]`` is NaN where class c is neither in the ground truth
    nor predicted; ``miou`` and ``mean_class_accuracy`` average over the classes that have a value."""

    miou: float
    pixel_accuracy: float
    mean_class_accuracy: float
    per_class_iou: list[float]
    n: int
    images_per_s: float = 0.0

    def to_dict(self) -> dict:
        """A JSON-ready dict (NaN, which JSON lacks, written as None)."""
        def clean(v: float) -> Optional[float]:
            return None if math.isnan(v) else v

        return {"miou": clean(self.miou), "pixel_accuracy": clean(self.pixel_accuracy),
                "mean_class_accuracy": clean(self.mean_class_accuracy),
                "per_class_iou": [clean(v) for v in self.per_class_iou], "n": self.n,
                "images_per_s": self.images_per_s}


def confusion_matrix(prediction: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = 255) -> torch.Tensor:
    """The (num_classes, num_classes) int64 counts [true class, predicted class] of the pixels not ignored."""
    if prediction.shape != target.shape:
        raise DataError(f"prediction of shape {tuple(prediction.shape)} for a mask of shape {tuple(target.shape)}; "
                        "expected the model's output at the mask's size")
    keep = target != ignore_index
    truth, predicted = target[keep].long(), prediction[keep].long()
    if truth.numel() and (int(truth.min()) < 0 or int(truth.max()) >= num_classes):
        raise DataError(f"a mask holds class {int(truth.max())}, outside 0 to {num_classes - 1} and not "
                        f"{ignore_index} (ignore); expected num_classes to match the data")
    counts = torch.bincount(truth * num_classes + predicted, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).cpu()


def segmentation_scores(confusion: torch.Tensor, n: int = 0, seconds: float = 0.0) -> SegmentationResult:
    """mIoU, pixel accuracy, mean class accuracy and per-class IoU (percent) of a confusion matrix."""
    confusion = confusion.double()
    hits = confusion.diag()
    truth, predicted = confusion.sum(1), confusion.sum(0)
    union = truth + predicted - hits
    iou = torch.where(union > 0, hits / union.clamp(min=1), torch.full_like(hits, float("nan")))
    recall = torch.where(truth > 0, hits / truth.clamp(min=1), torch.full_like(hits, float("nan")))
    total = float(confusion.sum())
    return SegmentationResult(
        miou=100.0 * float(iou.nanmean()),
        pixel_accuracy=100.0 * float(hits.sum()) / total if total else float("nan"),
        mean_class_accuracy=100.0 * float(recall.nanmean()),
        per_class_iou=[100.0 * float(v) for v in iou],
        n=n,
        images_per_s=n / seconds if seconds > 0 else 0.0,
    )


def evaluate_segmentation(model: nn.Module, dataset: Dataset, num_classes: int, *,
                          device: Union[str, torch.device] = "cpu", workers: int = 0, limit: Optional[int] = None,
                          ignore_index: int = 255, batch_size: int = 1,
                          progress: Optional[bool] = None) -> SegmentationResult:
    """mIoU, pixel accuracy, mean class accuracy and per-class IoU (percent) of ``model`` over ``dataset``.

    ``dataset`` items are (normalised image tensor, int64 mask), e.g. a SegmentationFolder with
    ``segmentation_eval_transform``; ``batch_size`` > 1 needs images of one size. The prediction is the argmax
    over classes of the model's output (a tensor, or torchvision's dict with "out"); pixels whose mask is
    ``ignore_index`` are left out. ``limit`` keeps the first N images.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise DataError(f"num_classes must be a whole number >= 1, got {num_classes!r}")
    data = dataset if limit is None else Subset(dataset, range(min(int(limit), len(dataset))))
    if len(data) == 0:
        raise DataError("no image to evaluate: the dataset is empty or limit is 0")
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=workers)
    device = torch.device(device)
    model = model.eval().to(device)
    show = progress if progress is not None else bool(sys.stderr is not None and sys.stderr.isatty())
    bar = _progress_bar(show, loader)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    n = 0
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            for batch in loader:
                images, masks = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
                out = model(images)
                logits = out["out"] if isinstance(out, dict) else out
                if logits.dim() != 4 or logits.shape[1] != num_classes:
                    raise DataError(f"the model's output has shape {tuple(logits.shape)}; expected (N, {num_classes}, "
                                    "H, W) class scores for num_classes classes")
                confusion += confusion_matrix(logits.argmax(1), masks, num_classes, ignore_index)
                n += images.shape[0]
                bar.update(images.shape[0])
    finally:
        bar.close()
    return segmentation_scores(confusion, n, time.perf_counter() - start)
