"""The 1-crop evaluation transform: resize the short side, centre crop, to tensor, normalise.

Two forms: on PIL images (the published protocol, for the "pil" decoder) and on uint8 tensors (for the
"torchvision" decoder). They differ only by the resampling of the resize (PIL's and torch's antialiased filters
round differently), a small difference measured by tests/test_eval_decoder.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Union

import torch
from torchvision import transforms
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from snzoo.data.datasets import DataError
from snzoo.data.decoders import check_decoder
from snzoo.zoo import EvalConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = {
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "nearest": InterpolationMode.NEAREST,
}
_OVERRIDABLE = ("resize", "crop", "interpolation", "mean", "std")


def interpolation_mode(name: str | InterpolationMode) -> InterpolationMode:
    """The torchvision mode for an interpolation name (bilinear, bicubic, nearest)."""
    if isinstance(name, InterpolationMode):
        return name
    mode = INTERPOLATIONS.get(str(name).lower())
    if mode is None:
        raise DataError(f"unknown interpolation {name!r}; expected one of {', '.join(INTERPOLATIONS)}")
    return mode


def _check_size(what: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise DataError(f"{what} must be a positive whole number of pixels, got {value!r}")
    return value


def _check_channels(what: str, values: Sequence[float]) -> tuple[float, ...]:
    try:
        triple = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        triple = ()
    if len(triple) not in (1, 3):
        raise DataError(f"{what} must be 3 numbers (one per RGB channel) or 1 (grayscale models), got {values!r}")
    return triple  # type: ignore[return-value]


def _checked(resize: Any, crop: Any, mean: Sequence[float],
             std: Sequence[float]) -> tuple[int, int, tuple[float, ...], tuple[float, ...]]:
    resize = _check_size("resize", resize)
    crop = _check_size("crop", crop)
    if crop > resize:
        # CenterCrop would pad with black borders, which no published protocol does.
        raise DataError(f"crop {crop} is larger than resize {resize}; expected crop <= resize (e.g. 224 of 256)")
    mean = _check_channels("mean", mean)
    std = _check_channels("std", std)
    if any(s <= 0 for s in std):
        raise DataError(f"std must be positive per channel, got {std!r}")
    return resize, crop, mean, std


class TensorEvalTransform:
    """uint8 (3, H, W) RGB tensor -> normalised (C, crop, crop) float tensor: the 1-crop protocol on tensors.

    Resize of the short side (antialiased), centre crop, scale to [0, 1] as ToTensor does, normalise.
    """

    def __init__(self, resize: int, crop: int, interpolation: InterpolationMode, mean: Sequence[float],
                 std: Sequence[float], uint8: bool = False) -> None:
        self.resize, self.crop, self.interpolation = resize, crop, interpolation
        self.mean, self.std = list(mean), list(std)
        self.uint8 = uint8  # stop before the scaling: BatchNormalize does it per batch

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        image = F.resize(image, [self.resize], interpolation=self.interpolation, antialias=True)
        image = F.center_crop(image, [self.crop, self.crop])
        if self.uint8:
            return image
        # float() then div(255) is ToTensor's own arithmetic, so equal pixels give bit-equal inputs.
        return F.normalize(image.float().div_(255), self.mean, self.std, inplace=True)


class BatchNormalize:
    """uint8 (N, C, H, W) batch -> normalised float batch: ToTensor's scaling and Normalize, once per batch.

    The same elementwise arithmetic as per-image ToTensor + Normalize, so the result is bit-identical, and much
    cheaper: loader workers hand over uint8 images (a quarter of the bytes to collate and pass between
    processes), and the arithmetic runs once per batch, on the model's device. A batch that is not uint8 (a
    user's own float transform) passes unchanged.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean, self.std = list(mean), list(std)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            return images
        return F.normalize(images.float().div_(255), self.mean, self.std, inplace=True)


def eval_transform(resize: int = 256, crop: int = 224, interpolation: str | InterpolationMode = "bilinear",
                   mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> transforms.Compose:
    """PIL RGB image -> normalised (3, crop, crop) float tensor, as in the published 1-crop protocol.

    The short side is resized to ``resize`` (antialiased, on the PIL image), then the centre ``crop`` x ``crop``
    square is taken.
    """
    resize, crop, mean, std = _checked(resize, crop, mean, std)
    return transforms.Compose([
        transforms.Resize(resize, interpolation=interpolation_mode(interpolation), antialias=True),
        transforms.CenterCrop(crop),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


def eval_tensor_transform(resize: int = 256, crop: int = 224, interpolation: str | InterpolationMode = "bilinear",
                          mean: Sequence[float] = IMAGENET_MEAN,
                          std: Sequence[float] = IMAGENET_STD) -> TensorEvalTransform:
    """``eval_transform`` for uint8 RGB tensors (the "torchvision" decoder's images), checked the same way."""
    resize, crop, mean, std = _checked(resize, crop, mean, std)
    return TensorEvalTransform(resize, crop, interpolation_mode(interpolation), mean, std)


def eval_uint8_transform_from_config(cfg: EvalConfig, *, decoder: str = "pil",
                                     **overrides: Any) -> tuple[Any, BatchNormalize]:
    """``eval_transform_from_config`` split in two: the per-image part up to uint8 (C, crop, crop) tensors, and
    the per-batch scaling and normalisation; applied one after the other they give its exact tensors."""
    full = eval_transform_from_config(cfg, decoder=decoder, **overrides)
    if isinstance(full, TensorEvalTransform):
        return (TensorEvalTransform(full.resize, full.crop, full.interpolation, full.mean, full.std, uint8=True),
                BatchNormalize(full.mean, full.std))
    resize, crop, _, normalize = full.transforms
    return transforms.Compose([resize, crop, transforms.PILToTensor()]), BatchNormalize(normalize.mean, normalize.std)


def eval_transform_from_config(cfg: EvalConfig, *, decoder: str = "pil",
                               **overrides: Any) -> Union[transforms.Compose, TensorEvalTransform]:
    """The evaluation transform of a zoo entry's ``EvalConfig``, with any of its settings overridden.

    Overrides are resize, crop, interpolation, mean and std; an override of None keeps the entry's value, so
    optional command-line options can be passed straight through. ``decoder`` picks the form: PIL images for
    "pil", uint8 tensors for "torchvision".
    """
    unknown = sorted(set(overrides) - set(_OVERRIDABLE))
    if unknown:
        raise DataError(f"unknown evaluation setting {unknown[0]!r}; expected one of {', '.join(_OVERRIDABLE)}")
    settings = {"resize": cfg.resize, "crop": cfg.crop, "interpolation": cfg.interpolation,
                "mean": cfg.mean, "std": cfg.std}
    settings.update({k: v for k, v in overrides.items() if v is not None})
    if check_decoder(decoder) == "torchvision":
        return eval_tensor_transform(**settings)
    return eval_transform(**settings)
