"""Task metrics: COCO AP through pycocotools (oracle, shifted and empty detectors on the garment scenes) and
segmentation scores against an independent per-pixel count."""

from __future__ import annotations

import contextlib
import io
import json
import math
import sys

import numpy as np
import pytest
import torch
from torch import nn

from snzoo.data import CocoDetection, detection_eval_transform
from snzoo.errors import DataError, IntegrationImportError
from snzoo.eval import COCO_STATS, evaluate_detection, evaluate_segmentation
from scenes import make_scenes, write_coco

pytestmark = pytest.mark.usefixtures("one_thread")

SHIFT_IOU = 0.625  # between COCO's thresholds 0.60 and 0.65: matched at 0.50, 0.55 and 0.60 only


def _key(image: torch.Tensor) -> bytes:
    return image.numpy().tobytes()


class TruthDetector(nn.Module):
    """Returns each image's ground truth (score 1), its boxes widened to `shift_iou` overlap when given."""

    def __init__(self, dataset: CocoDetection, masks: bool = True, shift_iou=None, empty: bool = False) -> None:
        super().__init__()
        self.truth = {_key(image): target for image, target in dataset}
        self.masks, self.shift_iou, self.empty = masks, shift_iou, empty

    def forward(self, images):
        outputs = []
        for image in images:
            target = self.truth[_key(image.cpu())]
            boxes = target["boxes"].clone()
            keep = slice(0, 0) if self.empty else slice(None)
            if self.shift_iou is not None:
                # Shifting a w-wide box right by d gives IoU (w - d) / (w + d) with the original.
                width = boxes[:, 2] - boxes[:, 0]
                shift = width * (1 - self.shift_iou) / (1 + self.shift_iou)
                boxes[:, 0] += shift
                boxes[:, 2] += shift
            out = {"boxes": boxes[keep], "labels": target["labels"][keep],
                   "scores": torch.ones(len(boxes))[keep]}
            if self.masks:
                out["masks"] = target["masks"][keep, None].float()
            outputs.append(out)
        return outputs


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = write_coco(make_scenes(10, objects=(1, 3), seed=7), tmp_path_factory.mktemp("coco"), "val")
    return CocoDetection(root, "val", transform=detection_eval_transform())


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    # One object per image: a shifted box can only be matched to its own object.
    root = write_coco(make_scenes(8, objects=(1, 1), seed=8), tmp_path_factory.mktemp("single"), "val")
    return CocoDetection(root, "val", transform=detection_eval_transform())


def _size_buckets(dataset: CocoDetection) -> dict[str, bool]:
    areas = [a["area"] for a in dataset.coco.dataset["annotations"]]
    return {"s": any(a < 32 ** 2 for a in areas), "m": any(32 ** 2 <= a < 96 ** 2 for a in areas),
            "l": any(a >= 96 ** 2 for a in areas)}


def test_oracle_detector_scores_100(coco):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = evaluate_detection(TruthDetector(coco), coco, batch_size=3)
    assert out.getvalue() == ""  # COCOeval's printing is kept out of stdout
    assert result.n == len(coco) and result.images_per_s > 0
    buckets = _size_buckets(coco)
    assert buckets["s"] and buckets["m"]
    for stats in (result.box, result.mask):
        assert list(stats) == list(COCO_STATS)
        assert stats["AP"] == stats["AP50"] == stats["AP75"] == pytest.approx(100.0)
        for size in "sml":
            assert stats[f"AP{size}"] == (pytest.approx(100.0) if buckets[size] else -1.0)
            assert stats[f"AR{size}"] == (pytest.approx(100.0) if buckets[size] else -1.0)
    json.dumps(result.to_dict())


def test_shifted_boxes_score_ap50_but_not_ap75(single):
    result = evaluate_detection(TruthDetector(single, masks=False, shift_iou=SHIFT_IOU), single)
    assert result.mask is None
    assert result.box["AP50"] == pytest.approx(100.0) and result.box["AP75"] == 0.0
    assert result.box["AP"] == pytest.approx(30.0)  # 3 of COCO's 10 IoU thresholds


def test_no_detections_score_zero(coco):
    result = evaluate_detection(TruthDetector(coco, empty=True), coco)
    buckets = _size_buckets(coco)
    for stats in (result.box, result.mask):
        assert stats["AP"] == stats["AP50"] == stats["AR100"] == 0.0
        assert stats["APs"] == 0.0 and stats["APl"] == (0.0 if buckets["l"] else -1.0)


def test_limit_scores_only_the_evaluated_images(coco):
    # The other 6 images hold objects no detection covers: counted, they would pull AP below 100.
    result = evaluate_detection(TruthDetector(coco, masks=False), coco, limit=4)
    assert result.n == 4 and result.box["AP"] == pytest.approx(100.0)


def test_pycocotools_missing_says_how_to_install(coco, monkeypatch):
    for name in [m for m in sys.modules if m.startswith("pycocotools")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    with pytest.raises(IntegrationImportError, match=r"pip install snzoo\[detection\]$"):
        evaluate_detection(TruthDetector(coco), coco)


def test_detection_bad_input(coco, tmp_path):
    raw = CocoDetection(coco.annotations_file.parents[1], "val")
    with pytest.raises(DataError, match="create it with transform=detection_eval_transform"):
        evaluate_detection(TruthDetector(coco), raw)
    with pytest.raises(DataError, match="no image to evaluate"):
        evaluate_detection(TruthDetector(coco), coco, limit=0)


class FixedPredictions(nn.Module):
    """Returns stored class scores, one batch after another."""

    def __init__(self, logits: list[torch.Tensor], as_dict: bool) -> None:
        super().__init__()
        self.logits, self.as_dict, self.calls = logits, as_dict, 0

    def forward(self, x):
        out = self.logits[self.calls]
        self.calls += 1
        return {"out": out} if self.as_dict else out


def _numpy_scores(preds: list[np.ndarray], masks: list[np.ndarray], classes: int, ignore: int):
    """Per-pixel loop counts, independent of the bincount in the library."""
    tp, fp, fn = np.zeros(classes), np.zeros(classes), np.zeros(classes)
    correct = total = 0
    for pred, mask in zip(preds, masks):
        for p, t in zip(pred.ravel().tolist(), mask.ravel().tolist()):
            if t == ignore:
                continue
            total += 1
            if p == t:
                correct += 1
                tp[t] += 1
            else:
                fp[p] += 1
                fn[t] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tp / (tp + fp + fn)
        recall = tp / (tp + fn)
    return iou * 100, 100.0 * correct / total, np.nanmean(recall) * 100


@pytest.mark.parametrize("as_dict", [True, False])
def test_segmentation_scores_match_a_pixel_count(as_dict):
    rng = np.random.default_rng(0)
    classes, ignore = 5, 255
    masks = [rng.integers(0, 4, size=(12, 17)) for _ in range(3)]  # class 4 never in the ground truth
    for mask in masks:
        mask[rng.random(mask.shape) < 0.2] = ignore
    masks[0][:, :3] = 3
    preds = [np.where(rng.random(m.shape) < 0.6, np.where(m == ignore, 0, m), rng.integers(0, 4, m.shape))
             for m in masks]
    preds[1][0, 0] = 4  # predicted once, never true: IoU 0, not NaN
    logits = [torch.nn.functional.one_hot(torch.from_numpy(p), classes).permute(2, 0, 1)[None].float()
              for p in preds]
    data = [(torch.zeros(3, 12, 17), torch.from_numpy(m).long()) for m in masks]
    result = evaluate_segmentation(FixedPredictions(logits, as_dict), data, classes, ignore_index=ignore)
    iou, accuracy, class_accuracy = _numpy_scores(preds, masks, classes, ignore)
    assert result.n == 3
    assert result.per_class_iou == pytest.approx(iou.tolist())
    assert result.per_class_iou[4] == 0.0
    assert result.miou == pytest.approx(float(np.mean(iou)))
    assert result.pixel_accuracy == pytest.approx(accuracy)
    assert result.mean_class_accuracy == pytest.approx(class_accuracy)


def test_segmentation_class_never_seen_is_nan():
    mask = torch.tensor([[0, 1], [1, 255]])
    logits = torch.nn.functional.one_hot(torch.tensor([[0, 1], [0, 2]]), 3).permute(2, 0, 1)[None].float()
    result = evaluate_segmentation(FixedPredictions([logits], True), [(torch.zeros(3, 2, 2), mask)], 3)
    # Pixel (1, 1) is ignored, so its prediction 2 counts nowhere: class 2 never appears.
    assert math.isnan(result.per_class_iou[2]) and result.to_dict()["per_class_iou"][2] is None
    # Pixel (1, 0), true 1 and predicted 0, halves both IoUs: 1 / (1 + 1).
    assert result.per_class_iou[:2] == pytest.approx([50.0, 50.0])
    assert result.miou == pytest.approx(50.0) and result.pixel_accuracy == pytest.approx(200 / 3)
    assert result.mean_class_accuracy == pytest.approx(75.0)
    json.dumps(result.to_dict())


def test_segmentation_bad_input():
    data = [(torch.zeros(3, 2, 2), torch.tensor([[0, 7], [1, 1]]))]
    logits = torch.zeros(1, 3, 2, 2)
    with pytest.raises(DataError, match="a mask holds class 7, outside 0 to 2"):
        evaluate_segmentation(FixedPredictions([logits], True), data, 3)
    with pytest.raises(DataError, match=r"expected \(N, 4, H, W\)"):
        evaluate_segmentation(FixedPredictions([logits], True), data, 4)
