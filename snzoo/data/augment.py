"""Training augmentation of the zoo's recipes, and a dataset wrapper that makes it reproducible per sample.

``train_transform`` and ``final_phase_transform`` build the transforms a recipe's ``augmentation`` object
describes (see ``weights_manifest.json``); ``SeededAugmentation`` applies them so that a sample's random crop,
flip, jitter and lighting depend only on ``(seed, epoch, index)``.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, get_worker_info
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from snzoo.data._seed_sequence import sample_seeds
from snzoo.data.datasets import DataError, Skipped, Transform
from snzoo.data.fashion_mnist import FASHION_MNIST_MEAN, FASHION_MNIST_STD
from snzoo.data.transforms import _check_size

__all__ = [
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "IMAGENET_PCA_EIGVAL",
    "IMAGENET_PCA_EIGVEC",
    "Lighting",
    "SeededAugmentation",
    "SeededPairAugmentation",
    "eval_transform_small",
    "final_phase_transform",
    "train_transform",
]

# The original release's PCA constants: eigenvalue i is paired with ROW i of this matrix (see Lighting).
IMAGENET_PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_PCA_EIGVEC = (
    (0.4009, 0.7192, -0.5675),
    (-0.8140, -0.0045, -0.5808),
    (0.4203, -0.6948, -0.5836),
)

KNOWN_KEYS = ("crop", "random_resized_crop", "pad_crop", "hflip", "lighting", "color_jitter",
              "grayscale_to_rgb", "final_phase")
_FINAL_PHASE_KEYS = ("epochs", "resize", "crop")
_LIGHTING_KINDS = ("original",)


class Lighting:
    """AlexNet-style PCA lighting noise as the original SN release applies it, on a [0, 1] CHW RGB tensor.

    Per call, ``alpha`` is 3 draws of N(0, alphastd**2) from torch's global RNG, and the same offset
    ``offset[c] = sum_i eigval[i] * alpha[i] * eigvec[i][c]`` is added to every pixel of channel c (R, G, B).
    The result is not clamped, as in the original.

    The pairing differs from fb.resnet.torch's: there the eigenvectors are the COLUMNS of
    ``[[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]]``, so the largest
    eigenvalue 0.2175 scales the near-uniform brightness direction (-0.5675, -0.5808, -0.5836). The original
    SN code uses the ROWS of that matrix with its columns reversed (``IMAGENET_PCA_EIGVEC``), so 0.2175 scales
    (0.4009, 0.7192, -0.5675), which is not a PCA direction: the strongest noise shifts green against blue
    rather than brightness. It is kept here because it is what the released models were trained with.
    """

    def __init__(self, alphastd: float = 0.1, eigval: Sequence[float] = IMAGENET_PCA_EIGVAL,
                 eigvec: Sequence[Sequence[float]] = IMAGENET_PCA_EIGVEC) -> None:
        if isinstance(alphastd, bool) or not isinstance(alphastd, (int, float)) or alphastd < 0:
            raise DataError(f"lighting alphastd must be a number >= 0, got {alphastd!r}")
        try:
            self.eigval = torch.tensor(eigval, dtype=torch.float32)
            self.eigvec = torch.tensor(eigvec, dtype=torch.float32)
        except (TypeError, ValueError) as exc:
            raise DataError(f"lighting eigval/eigvec must be numbers: {exc}; "
                            "expected 3 values and a 3x3 matrix") from None
        if self.eigval.shape != (3,) or self.eigvec.shape != (3, 3):
            raise DataError(f"lighting eigval has shape {tuple(self.eigval.shape)} and eigvec "
                            f"{tuple(self.eigvec.shape)}; expected (3,) and (3, 3)")
        self.alphastd = float(alphastd)

    def offset(self, alpha: torch.Tensor) -> torch.Tensor:
        """The (3,) per-channel offset for the 3 draws ``alpha`` (already scaled by alphastd)."""
        return (self.eigval * alpha) @ self.eigvec

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if not isinstance(img, torch.Tensor) or img.dim() != 3 or img.shape[0] != 3 or not img.is_floating_point():
            what = f"a {img.dtype} tensor of shape {tuple(img.shape)}" if isinstance(img, torch.Tensor) else type(img)
            raise DataError(f"Lighting needs a float RGB tensor of shape (3, H, W) after ToTensor, got {what}; "
                            "expected lighting only for 3-channel images")
        if self.alphastd == 0:
            return img
        alpha = torch.empty(3).normal_(0.0, self.alphastd)
        return img + self.offset(alpha).to(img.dtype).view(3, 1, 1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(alphastd={self.alphastd})"


def _check_stats(mean: Sequence[float], std: Sequence[float]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    try:
        mean_t, std_t = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    except (TypeError, ValueError):
        raise DataError(f"mean {mean!r} and std {std!r} must be sequences of numbers; "
                        "expected 1 value each (grayscale) or 3 (RGB)") from None
    if len(mean_t) != len(std_t) or len(mean_t) not in (1, 3):
        raise DataError(f"mean has {len(mean_t)} values and std {len(std_t)}; expected 1 each (grayscale) or 3 (RGB)")
    if any(s <= 0 for s in std_t):
        raise DataError(f"std must be positive per channel, got {std_t!r}")
    return mean_t, std_t


def _check_aug(aug: Mapping[str, Any]) -> Mapping[str, Any]:
    if not isinstance(aug, Mapping):
        raise DataError(f"augmentation must be a mapping (a recipe's 'augmentation' object), got {type(aug).__name__}")
    unknown = sorted(set(aug) - set(KNOWN_KEYS))
    if unknown:
        raise DataError(f"unknown augmentation key {unknown[0]!r}; expected keys among {', '.join(KNOWN_KEYS)}")
    if "crop" not in aug:
        raise DataError("augmentation has no 'crop'; expected the training crop size in pixels, e.g. 224")
    _check_size("augmentation crop", aug["crop"])
    for key in ("random_resized_crop", "hflip", "grayscale_to_rgb"):
        if aug.get(key) is not None and not isinstance(aug[key], bool):
            raise DataError(f"augmentation {key} must be true or false, got {aug[key]!r}")
    if aug.get("lighting") not in (None, *_LIGHTING_KINDS):
        raise DataError(f"augmentation lighting {aug['lighting']!r} is unknown; expected null or 'original'")
    jitter = aug.get("color_jitter")
    if jitter is not None and (isinstance(jitter, bool) or not isinstance(jitter, (int, float)) or jitter < 0):
        raise DataError(f"augmentation color_jitter must be null or a number >= 0, got {jitter!r}")
    pad = aug.get("pad_crop")
    if pad is not None:
        if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
            raise DataError(f"augmentation pad_crop must be a whole number of pixels >= 0, got {pad!r}")
        if aug.get("random_resized_crop"):
            raise DataError("augmentation sets both random_resized_crop and pad_crop; expected one crop kind")
    return aug


def _tail(aug: Mapping[str, Any], mean: Sequence[float], std: Sequence[float]) -> list[Any]:
    """Flip, [ColorJitter], ToTensor, [Lighting], Normalize: the part every training phase shares."""
    mean_t, std_t = _check_stats(mean, std)
    if aug.get("grayscale_to_rgb") and len(mean_t) != 3:
        raise DataError(f"grayscale_to_rgb gives 3 channels but mean/std have {len(mean_t)} value(s); expected 3")
    if aug.get("lighting") and len(mean_t) != 3:
        raise DataError(f"lighting needs RGB images but mean/std have {len(mean_t)} value(s); expected 3")
    steps: list[Any] = []
    if aug.get("hflip"):
        steps.append(transforms.RandomHorizontalFlip())
    jitter = aug.get("color_jitter")
    if jitter:
        steps.append(transforms.ColorJitter(jitter, jitter, jitter))
    steps.append(transforms.ToTensor())
    if aug.get("lighting") == "original":
        steps.append(Lighting(0.1))
    steps.append(transforms.Normalize(mean_t, std_t))
    return steps


def _head(aug: Mapping[str, Any]) -> list[Any]:
    # Grayscale sources fed to RGB models are replicated to 3 channels before anything else.
    return [transforms.Grayscale(num_output_channels=3)] if aug.get("grayscale_to_rgb") else []


def train_transform(aug: Mapping[str, Any], mean: Sequence[float], std: Sequence[float]) -> transforms.Compose:
    """The main-phase training transform of a recipe's ``augmentation`` object: PIL image -> normalised tensor.

    ImageNet recipes: RandomResizedCrop(crop) (default scale, bilinear), horizontal flip, ColorJitter(b, b, b)
    when ``color_jitter`` is b, ToTensor, the original PCA ``Lighting`` when ``lighting`` is "original",
    Normalize. Small-image recipes use ``pad_crop: p`` (RandomCrop(crop, padding=p)) instead of
    ``random_resized_crop``; without either the crop is RandomCrop(crop). ``grayscale_to_rgb: true`` turns
    1-channel images into 3 channels first. ``final_phase`` is read by ``final_phase_transform``.
    """
    _check_aug(aug)
    crop = aug["crop"]
    if aug.get("random_resized_crop"):
        first: Any = transforms.RandomResizedCrop(crop, interpolation=InterpolationMode.BILINEAR)
    else:
        first = transforms.RandomCrop(crop, padding=aug.get("pad_crop") or None)
    return transforms.Compose([*_head(aug), first, *_tail(aug, mean, std)])


def final_phase_transform(aug: Mapping[str, Any], mean: Sequence[float], std: Sequence[float]) -> transforms.Compose:
    """The transform of a recipe's last epochs (``aug["final_phase"]``): Resize(resize), then a centre or random
    ``crop`` x ``crop`` square, then the same flip, jitter, lighting and normalisation as the main phase."""
    _check_aug(aug)
    phase = aug.get("final_phase")
    if phase is None:
        raise DataError("this recipe has no final_phase; expected an object with epochs, resize and crop")
    if not isinstance(phase, Mapping) or sorted(phase) != sorted(_FINAL_PHASE_KEYS):
        raise DataError(f"final_phase {phase!r} is malformed; expected exactly the keys {', '.join(_FINAL_PHASE_KEYS)}")
    epochs = phase["epochs"]
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs <= 0:
        raise DataError(f"final_phase epochs must be a whole number > 0, got {epochs!r}")
    resize = _check_size("final_phase resize", phase["resize"])
    crop = aug["crop"]
    if crop > resize:
        raise DataError(f"crop {crop} is larger than final_phase resize {resize}; expected crop <= resize")
    if phase["crop"] == "center":
        cropper: Any = transforms.CenterCrop(crop)
    elif phase["crop"] == "random":
        cropper = transforms.RandomCrop(crop)
    else:
        raise DataError(f"final_phase crop {phase['crop']!r} is unknown; expected 'center' or 'random'")
    resizer = transforms.Resize(resize, interpolation=InterpolationMode.BILINEAR, antialias=True)
    return transforms.Compose([*_head(aug), resizer, cropper, *_tail(aug, mean, std)])


def eval_transform_small(crop: int, mean: Sequence[float] = FASHION_MNIST_MEAN,
                         std: Sequence[float] = FASHION_MNIST_STD) -> transforms.Compose:
    """Evaluation transform for small images: ToTensor and Normalize, resized to ``crop`` x ``crop`` only if needed.

    An image that already is ``crop`` x ``crop`` (e.g. Fashion-MNIST at 28) passes Resize and CenterCrop
    unchanged: torchvision returns it untouched when its size already matches.
    """
    crop = _check_size("crop", crop)
    mean_t, std_t = _check_stats(mean, std)
    return transforms.Compose([
        transforms.Resize(crop, interpolation=InterpolationMode.BILINEAR, antialias=True),
        transforms.CenterCrop(crop),
        transforms.ToTensor(),
        transforms.Normalize(mean_t, std_t),
    ])


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    # SeedSequence mixes the three numbers so that nearby (epoch, index) pairs get unrelated streams.
    words = np.random.SeedSequence([seed, epoch, index]).generate_state(2, dtype=np.uint32)
    return int(words[0]) << 32 | int(words[1])


def _check_count(what: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise DataError(f"{what} must be a whole number >= 0, got {value!r}")
    return int(value)


class SeededAugmentation(Dataset):
    """Items ``(transform(image), label, index)`` whose randomness depends only on ``(seed, epoch, index)``.

    Each sample is transformed with torch's and Python's ``random`` RNGs seeded from ``(seed, epoch, index)``,
    so the augmentation is identical for any number of DataLoader workers and after resuming mid-epoch, and
    the global RNG states are left as they were. ``index`` is the position in
    this wrapper. The wrapped dataset must yield ``(PIL image, label[, index])``: FashionMNIST, or snzoo's
    folder and list-file datasets created with ``transform=None``; their ``Skipped`` records pass through.

    Call ``set_epoch`` before each epoch's DataLoader iterator is created: workers copy the wrapper when the
    iterator starts, so with ``persistent_workers=True`` a later ``set_epoch`` would not reach them.
    """

    def __init__(self, dataset: Dataset, transform: Transform, seed: int = 0) -> None:
        if getattr(dataset, "transform", None) is not None:
            raise DataError(f"{type(dataset).__name__} already has a transform; expected it created with "
                            "transform=None so that SeededAugmentation receives PIL images")
        self.dataset = dataset
        self.seed = _check_count("seed", seed)
        self.epoch = 0
        self.set_transform(transform)
        self._seeds_of: tuple[int, int, int] | None = None  # the (seed, epoch, length) of self._seeds
        self._seeds: np.ndarray | None = None

    def set_epoch(self, epoch: int) -> None:
        """Use the random streams of ``epoch`` for the following items."""
        self.epoch = _check_count("epoch", epoch)

    def set_transform(self, transform: Transform) -> None:
        """Switch the transform, e.g. to ``final_phase_transform`` for a recipe's last epochs."""
        if not callable(transform):
            raise DataError(f"transform must be callable (PIL image -> tensor, or a pair transform), "
                            f"got {type(transform).__name__}")
        self.transform = transform

    @property
    def num_classes(self) -> int:
        """The wrapped dataset's class count."""
        return self.dataset.num_classes  # type: ignore[attr-defined]

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, int, int] | Skipped:
        item = self._pil_item(index)
        if isinstance(item, Skipped):
            return item
        image, label = item
        return self._apply(int(index), image), label, int(index)

    def _pil_item(self, index: int) -> tuple[Image.Image, Any] | Skipped:
        """The wrapped dataset's ``(PIL image, label or target)`` of ``index``, checked, or its Skipped record."""
        item = self.dataset[index]
        if isinstance(item, Skipped):
            return item
        if not isinstance(item, tuple) or len(item) not in (2, 3):
            raise DataError(f"{type(self.dataset).__name__} item {index} is a {type(item).__name__}; "
                            "expected (image, label) or (image, label, index)")
        image = item[0]
        if not isinstance(image, Image.Image):
            raise DataError(f"{type(self.dataset).__name__} item {index} holds a {type(image).__name__}, not a PIL "
                            "image; expected the dataset created with transform=None")
        return image, item[1]

    def _apply(self, index: int, *inputs: Any) -> Any:
        """``self.transform(*inputs)`` with the generators seeded for sample ``index``."""
        sample_seed = self._sample_seed(index)
        # Only the generators the transforms draw from are seeded: torch.manual_seed would also queue a lazy
        # CUDA seeding (with a stack trace) per sample where CUDA is not initialised, more than a small image's
        # whole transform costs. Where CUDA runs in this process it is seeded as torch.manual_seed seeds it.
        if get_worker_info() is not None:
            # A worker's generators feed nothing but these transforms, each seeded first: nothing to restore.
            torch.default_generator.manual_seed(sample_seed)
            random.seed(sample_seed)
            return self.transform(*inputs)
        torch_state, python_state = torch.get_rng_state(), random.getstate()
        torch.default_generator.manual_seed(sample_seed)
        if torch.cuda.is_initialized():
            torch.cuda.manual_seed_all(sample_seed)
        random.seed(sample_seed)
        try:
            return self.transform(*inputs)
        finally:
            torch.set_rng_state(torch_state)
            random.setstate(python_state)

    def _sample_seed(self, index: int) -> int:
        count = len(self)
        if not 0 <= index < count:
            return _sample_seed(self.seed, self.epoch, index)
        if self._seeds_of != (self.seed, self.epoch, count):
            # One vectorised SeedSequence pass per epoch: a SeedSequence per sample costs about 20 us.
            self._seeds, self._seeds_of = sample_seeds(self.seed, self.epoch, count), (self.seed, self.epoch, count)
        return int(self._seeds[index])


class SeededPairAugmentation(SeededAugmentation):
    """Items ``(image, target, index)`` of a pair transform ``transform(image, target) -> (image, target)``
    (detection boxes and masks, segmentation masks), seeded per sample exactly as ``SeededAugmentation`` is.

    The wrapped dataset must be created with ``transform=None`` and yield ``(PIL image, target)``:
    ``CocoDetection`` (target a dict) or ``SegmentationFolder`` (target an int64 mask).
    """

    def __getitem__(self, index: int) -> tuple[Any, Any, int] | Skipped:
        item = self._pil_item(index)
        if isinstance(item, Skipped):
            return item
        image, target = self._apply(int(index), *item)
        return image, target, int(index)
