"""Detection evaluation: a detector over a COCO-format set, scored by pycocotools' COCOeval (box and mask AP).

The metric is pycocotools itself, run as torchvision's references run it: the model's boxes (xyxy -> xywh),
scores and labels (= COCO category ids), and its masks thresholded at 0.5 and RLE-encoded, go through
``COCO.loadRes`` and ``COCOeval(...).evaluate / accumulate / summarize`` over the evaluated images only.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from typing import Optional, Union

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from snzoo.data.coco import CocoDetection, _pycocotools, _quiet, collate_detection
from snzoo.errors import DataError
from snzoo.eval.engine import _progress_bar

__all__ = ["COCO_STATS", "DetectionResult", "evaluate_detection"]

# The 12 numbers COCOeval.summarize prints, in its order.
COCO_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


@dataclass
class DetectionResult:
    """COCO box (and mask) AP / AR in percent, named as ``COCO_STATS``; -1 where COCO has no object of a size.

    ``mask`` is None when the model returns no masks.
    """

    box: dict[str, float]
    mask: Optional[dict[str, float]]
    n: int
    images_per_s: float

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return asdict(self)


def _results(outputs: list[dict], image_ids: list[int], with_masks: bool) -> tuple[list[dict], list[dict]]:
    """COCO result records of one batch: boxes for "bbox", RLE masks for "segm"."""
    mask_util = _pycocotools().mask
    boxes, masks = [], []
    for output, image_id in zip(outputs, image_ids):
        xyxy = output["boxes"].detach().float().cpu()
        xywh = torch.cat([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], dim=1).tolist()
        scores = output["scores"].detach().float().cpu().tolist()
        labels = output["labels"].detach().cpu().tolist()
        for box, score, label in zip(xywh, scores, labels):
            boxes.append({"image_id": image_id, "category_id": int(label), "bbox": box, "score": score})
        if with_masks:
            binary = (output["masks"].detach().cpu()[:, 0] > 0.5).numpy().astype(np.uint8)
            for mask, score, label in zip(binary, scores, labels):
                rle = mask_util.encode(np.asfortranarray(mask))
                rle["counts"] = rle["counts"].decode("ascii")
                masks.append({"image_id": image_id, "category_id": int(label), "segmentation": rle, "score": score})
    return boxes, masks


def _coco_stats(coco_gt, results: list[dict], iou_type: str, image_ids: list[int]) -> dict[str, float]:
    """COCOeval's 12 summary numbers in percent (-1 kept) for ``results`` over ``image_ids``."""
    tools = _pycocotools()
    with _quiet():
        if results:
            coco_dt = coco_gt.loadRes(results)
        else:
            # loadRes cannot take an empty list; an empty result set scores 0 (and -1 where COCO has no object).
            coco_dt = tools.coco.COCO()
            coco_dt.dataset = {"images": list(coco_gt.dataset["images"]), "annotations": [],
                               "categories": list(coco_gt.dataset["categories"])}
            coco_dt.createIndex()
        evaluator = tools.cocoeval.COCOeval(coco_gt, coco_dt, iou_type)
        evaluator.params.imgIds = sorted(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: (100.0 * float(v) if v >= 0 else -1.0) for name, v in zip(COCO_STATS, evaluator.stats)}


def evaluate_detection(model: nn.Module, dataset: CocoDetection, *, batch_size: int = 2,
                       device: Union[str, torch.device] = "cpu", workers: int = 0, limit: Optional[int] = None,
                       progress: Optional[bool] = None) -> DetectionResult:
    """COCO box AP (and mask AP when the model returns masks) of a torchvision-style detector over ``dataset``.

    ``dataset`` is a CocoDetection with ``detection_eval_transform()`` (items (image tensor, target)); the
    model in eval mode takes a list of images and returns per image a dict of ``boxes`` (xyxy), ``labels``
    (category ids), ``scores`` and optionally ``masks`` ((K, 1, H, W) probabilities). ``limit`` keeps the first
    N images; COCOeval scores exactly the images evaluated.
    """
    _pycocotools()  # before the model runs: without it nothing can be scored
    if not isinstance(dataset, CocoDetection):
        raise DataError(f"evaluate_detection needs a CocoDetection, got {type(dataset).__name__}")
    if dataset.transform is None:
        raise DataError("the CocoDetection gives PIL images; create it with transform=detection_eval_transform()")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
    data = dataset if limit is None else Subset(dataset, range(min(int(limit), len(dataset))))
    if len(data) == 0:
        raise DataError("no image to evaluate: the dataset is empty or limit is 0")
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=collate_detection)
    device = torch.device(device)
    model = model.eval().to(device)
    show = progress if progress is not None else bool(sys.stderr is not None and sys.stderr.isatty())
    bar = _progress_bar(show, loader)
    boxes: list[dict] = []
    masks: list[dict] = []
    image_ids: list[int] = []
    with_masks: Optional[bool] = None
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            for images, targets in loader:
                outputs = model([image.to(device, non_blocking=True) for image in images])
                ids = [int(t["image_id"]) for t in targets]
                if with_masks is None:
                    with_masks = bool(outputs) and "masks" in outputs[0]
                batch_boxes, batch_masks = _results(outputs, ids, with_masks)
                boxes += batch_boxes
                masks += batch_masks
                image_ids += ids
                bar.update(len(images))
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    box = _coco_stats(dataset.coco, boxes, "bbox", image_ids)
    mask = _coco_stats(dataset.coco, masks, "segm", image_ids) if with_masks else None
    n = len(image_ids)
    return DetectionResult(box=box, mask=mask, n=n, images_per_s=n / seconds if seconds > 0 else float("inf"))
