"""Evaluation of fine-tuned detectors and segmenters (task entries written by `snzoo finetune --task`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from snzoo.errors import DataError
from snzoo.eval.detection import COCO_STATS
from snzoo.eval.results import append_rows

SEGMENTATION_COLUMNS = ["model", "task", "dataset", "n", "miou", "pixel_accuracy", "mean_class_accuracy",
                        "images_per_s", "checkpoint_sha256"]
DETECTION_COLUMNS = (["model", "task", "dataset", "n"] + [f"box_{s}" for s in COCO_STATS]
                     + [f"mask_{s}" for s in COCO_STATS] + ["images_per_s", "checkpoint_sha256"])


@dataclass
class TaskEvalResult:
    """The metrics of one task model on one data set (percent), with what was evaluated."""

    model: str
    task: str
    dataset: str
    n: int
    metrics: dict
    images_per_s: float
    checkpoint_sha256: Optional[str] = None
    published: dict = field(default_factory=dict)  # the metrics its entry records for this data set, if any

    def to_dict(self) -> dict:
        """JSON-ready: every field."""
        return {"model": self.model, "task": self.task, "dataset": self.dataset, "n": self.n, **self.metrics,
                "images_per_s": self.images_per_s, "checkpoint_sha256": self.checkpoint_sha256,
                "recorded": self.published}

    def row(self) -> dict:
        """One results-file row (box_ / mask_ prefixed COCO stats, or mIoU and accuracies)."""
        row = {"model": self.model, "task": self.task, "dataset": self.dataset, "n": self.n,
               "images_per_s": round(self.images_per_s, 2), "checkpoint_sha256": self.checkpoint_sha256}
        if self.task == "detection":
            for kind in ("box", "mask"):
                for stat in COCO_STATS:
                    values = self.metrics.get(kind) or {}
                    row[f"{kind}_{stat}"] = round(values[stat], 3) if stat in values else None
        else:
            row.update({k: None if self.metrics[k] is None else round(self.metrics[k], 3)
                        for k in ("miou", "pixel_accuracy", "mean_class_accuracy")})
        return row


def _dataset(task: str, data: Union[str, os.PathLike], split: str, entry: dict):
    root = Path(data)
    if not root.is_dir():
        raise DataError(f"--data {data}: no such folder; expected a COCO-format folder (detection) or a VOC-style "
                        "folder (segmentation)")
    if task == "detection":
        from snzoo.data import CocoDetection, detection_eval_transform

        return CocoDetection(root, split, transform=detection_eval_transform())
    from snzoo.data import SegmentationFolder, segmentation_eval_transform

    config = entry.get("eval") or {}
    transform = segmentation_eval_transform(config.get("mean"), config.get("std"))
    return SegmentationFolder(root, split, transform=transform, num_classes=entry["num_classes"])


def evaluate_task_model(
    source: Union[str, os.PathLike],
    data: Union[str, os.PathLike],
    *,
    task: Optional[str] = None,
    split: str = "val",
    batch_size: int = 2,
    workers: int = 0,
    device: str = "cpu",
    limit: Optional[int] = None,
    progress: Optional[bool] = None,
) -> TaskEvalResult:
    """COCO box / mask AP (detection) or mIoU (segmentation) of a fine-tuned task model on `data`'s `split`.

    source: a fine-tuning run directory, its entry.json, or a task entry of the zoo (MODEL.TAG). The data is opened
    before the weights are read.
    """
    from snzoo.tasks import load_task_model, resolve_task_entry

    name, entry, _ = resolve_task_entry(source)
    if task is not None and task != entry["task"]:
        raise DataError(f"{name} is a {entry['task']} model; pass --task {entry['task']}")
    dataset = _dataset(entry["task"], data, split, entry)
    model, entry = load_task_model(source)
    dataset_name = f"{Path(data).name}-{split}"
    if entry["task"] == "detection":
        from snzoo.eval.detection import evaluate_detection

        result = evaluate_detection(model, dataset, batch_size=batch_size, device=device, workers=workers,
                                    limit=limit, progress=progress)
        metrics = {"box": result.box, "mask": result.mask}
    else:
        from snzoo.eval.segmentation import evaluate_segmentation

        result = evaluate_segmentation(model, dataset, entry["num_classes"], device=device, workers=workers,
                                       limit=limit, progress=progress)
        scores = result.to_dict()  # JSON-ready: a class absent from the data has IoU None, not NaN
        metrics = {k: scores[k] for k in ("miou", "pixel_accuracy", "mean_class_accuracy", "per_class_iou")}
    return TaskEvalResult(model=name, task=entry["task"], dataset=dataset_name, n=result.n, metrics=metrics,
                          images_per_s=getattr(result, "images_per_s", 0.0),
                          checkpoint_sha256=entry["sources"][0].get("sha256"),
                          published=(entry.get("metrics") or {}).get(f"{Path(data).name}-val", {}) if split == "val" else {})


def append_task_results(path: Union[str, os.PathLike], results: list[TaskEvalResult]) -> Path:
    """Append task results to a .csv or .json results file (one row each; columns by task)."""
    columns = DETECTION_COLUMNS if results[0].task == "detection" else SEGMENTATION_COLUMNS
    return append_rows(path, [r.row() for r in results], columns)


def task_result_line(result: TaskEvalResult) -> str:
    """The line `snzoo eval --task` prints."""
    if result.task == "detection":
        text = f"{result.model}: box AP {result.metrics['box']['AP']:.2f} AP50 {result.metrics['box']['AP50']:.2f}"
        if result.metrics.get("mask"):
            text += f"  mask AP {result.metrics['mask']['AP']:.2f} AP50 {result.metrics['mask']['AP50']:.2f}"
    else:
        text = (f"{result.model}: mIoU {result.metrics['miou']:.2f}  pixel accuracy "
                f"{result.metrics['pixel_accuracy']:.2f}")
    return f"{text}  on {result.n} images of {result.dataset}"
