"""Transforms of (image, target) pairs for detection and segmentation: what moves the image moves its labels.

Every random choice is drawn from torch's global RNG, so ``SeededPairAugmentation`` (which seeds it per sample
from ``(seed, epoch, index)``) makes the augmentation reproducible for any number of DataLoader workers.

* Detection targets are dicts as ``CocoDetection`` gives them: ``boxes`` (K, 4) xyxy in pixels, ``masks``
  (K, H, W) uint8 when present, and fields the transforms leave alone (labels, image_id, area, iscrowd).
* Segmentation targets are int64 (H, W) masks with 255 marking pixels to ignore.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from snzoo.data.augment import _check_stats
from snzoo.data.datasets import DataError
from snzoo.data.transforms import _check_size

__all__ = [
    "SEGMENTATION_IGNORE",
    "detection_eval_transform",
    "detection_train_transform",
    "segmentation_eval_transform",
    "segmentation_train_transform",
]

# The mask value of pixels that count neither as right nor wrong (VOC's object borders, crop padding).
SEGMENTATION_IGNORE = 255


def _flip_detection(image: Image.Image, target: dict) -> tuple[Image.Image, dict]:
    width = image.width
    target = dict(target)
    boxes = target["boxes"].clone()
    # Pixel-edge coordinates: a box [x0, x1) maps to [W - x1, W - x0).
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    target["boxes"] = boxes
    if "masks" in target:
        target["masks"] = target["masks"].flip(-1)
    return TF.hflip(image), target


class _DetectionTransform:
    """Random horizontal flip (probability ``flip``) of image, boxes and masks, then the image as a [0, 1] tensor."""

    def __init__(self, flip: float) -> None:
        self.flip = flip

    def __call__(self, image: Image.Image, target: dict) -> tuple[torch.Tensor, dict]:
        if not isinstance(image, Image.Image) or not isinstance(target, dict) or "boxes" not in target:
            raise DataError(f"a detection transform takes (PIL image, target dict with 'boxes'), got "
                            f"({type(image).__name__}, {type(target).__name__}); expected a dataset created "
                            "with transform=None, such as CocoDetection")
        if self.flip > 0 and float(torch.rand(())) < self.flip:
            image, target = _flip_detection(image, target)
        return TF.to_tensor(image), target

    def __repr__(self) -> str:
        return f"{type(self).__name__}(flip={self.flip})"


def detection_train_transform(flip: float = 0.5) -> _DetectionTransform:
    """Detection training pairs: a random horizontal flip (probability ``flip``) of the image, its boxes and
    masks, then the image as a float tensor in [0, 1]. The detector resizes and normalises by itself."""
    if isinstance(flip, bool) or not isinstance(flip, (int, float)) or not 0 <= flip <= 1:
        raise DataError(f"flip probability must be a number from 0 to 1, got {flip!r}")
    return _DetectionTransform(float(flip))


def detection_eval_transform() -> _DetectionTransform:
    """Detection evaluation pairs: the image as a float tensor in [0, 1], the target unchanged."""
    return _DetectionTransform(0.0)


def _check_mask(image: Image.Image, mask: Any) -> torch.Tensor:
    if not isinstance(image, Image.Image) or not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise DataError(f"a segmentation transform takes (PIL image, (H, W) mask tensor), got "
                        f"({type(image).__name__}, {type(mask).__name__}); expected a dataset created with "
                        "transform=None, such as SegmentationFolder")
    if tuple(mask.shape) != (image.height, image.width):
        raise DataError(f"mask of shape {tuple(mask.shape)} for an image of {image.height}x{image.width}; "
                        "expected a mask of the image's size")
    return mask


def _resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    # Nearest neighbour keeps labels labels; float32 holds every value up to 255 exactly.
    resized = F.interpolate(mask[None, None].float(), size=size, mode="nearest")
    return resized[0, 0].to(mask.dtype)


class _SegmentationTrain:
    """Random scale, pad (image 0, mask 255) up to the crop, random crop, random flip, tensor, normalise."""

    def __init__(self, crop: tuple[int, int], mean: tuple[float, ...], std: tuple[float, ...],
                 scale: tuple[float, float]) -> None:
        self.crop, self.mean, self.std, self.scale = crop, mean, std, scale

    def __call__(self, image: Image.Image, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = _check_mask(image, mask)
        low, high = self.scale
        factor = low + (high - low) * float(torch.rand(()))
        size = (max(1, round(image.height * factor)), max(1, round(image.width * factor)))
        image = TF.resize(image, list(size), interpolation=InterpolationMode.BILINEAR, antialias=True)
        mask = _resize_mask(mask, size)
        crop_h, crop_w = self.crop
        pad_h, pad_w = max(crop_h - size[0], 0), max(crop_w - size[1], 0)
        if pad_h or pad_w:
            # Right and bottom, as torchvision's segmentation references pad.
            image = TF.pad(image, [0, 0, pad_w, pad_h], fill=0)
            mask = F.pad(mask, (0, pad_w, 0, pad_h), value=SEGMENTATION_IGNORE)
        top = int(torch.randint(0, mask.shape[0] - crop_h + 1, ()))
        left = int(torch.randint(0, mask.shape[1] - crop_w + 1, ()))
        image = TF.crop(image, top, left, crop_h, crop_w)
        mask = mask[top:top + crop_h, left:left + crop_w]
        if float(torch.rand(())) < 0.5:
            image, mask = TF.hflip(image), mask.flip(-1)
        tensor = TF.normalize(TF.to_tensor(image), self.mean, self.std)
        return tensor, mask.contiguous()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(crop={self.crop}, scale={self.scale}, mean={self.mean}, std={self.std})"


class _SegmentationEval:
    """The whole image as a normalised tensor; the mask unchanged."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.mean, self.std = mean, std

    def __call__(self, image: Image.Image, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = _check_mask(image, mask)
        return TF.normalize(TF.to_tensor(image), self.mean, self.std), mask

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mean={self.mean}, std={self.std})"


def _crop_size(crop_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(crop_size, Sequence) and not isinstance(crop_size, str):
        if len(crop_size) != 2:
            raise DataError(f"crop_size {crop_size!r} must be one size or (height, width)")
        return _check_size("crop height", crop_size[0]), _check_size("crop width", crop_size[1])
    size = _check_size("crop_size", crop_size)
    return size, size


def segmentation_train_transform(crop_size: int | Sequence[int], mean: Sequence[float], std: Sequence[float],
                                 scale: tuple[float, float] = (0.5, 2.0)) -> _SegmentationTrain:
    """Segmentation training pairs: scale the image by a uniform factor in ``scale`` (mask nearest), pad the
    bottom and right up to ``crop_size`` (image with 0, mask with 255 = ignore), crop ``crop_size`` (one size or
    (height, width)) at a random place, flip horizontally with probability 0.5, then tensor and normalise."""
    crop = _crop_size(crop_size)
    mean_t, std_t = _check_stats(mean, std)
    try:
        low, high = (float(v) for v in scale)
    except (TypeError, ValueError):
        raise DataError(f"scale {scale!r} must be two numbers (low, high), e.g. (0.5, 2.0)") from None
    if not 0 < low <= high:
        raise DataError(f"scale {scale!r} must satisfy 0 < low <= high, e.g. (0.5, 2.0)")
    return _SegmentationTrain(crop, mean_t, std_t, (low, high))


def segmentation_eval_transform(mean: Sequence[float], std: Sequence[float]) -> _SegmentationEval:
    """Segmentation evaluation pairs: the whole image as a normalised tensor, the mask unchanged."""
    mean_t, std_t = _check_stats(mean, std)
    return _SegmentationEval(mean_t, std_t)
