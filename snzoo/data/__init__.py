"""Evaluation data: image decoding, the 1-crop transform, and ImageNet-style folder and list-file datasets."""

from snzoo.data.datasets import (
    IMG_EXTENSIONS,
    BadImageError,
    DataError,
    EvalBatch,
    EvalDataset,
    ImageFolderDataset,
    ListFileDataset,
    Skipped,
    build_eval_dataset,
    collate_skip_bad,
    load_rgb,
)
from snzoo.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    INTERPOLATIONS,
    eval_transform,
    eval_transform_from_config,
    interpolation_mode,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMG_EXTENSIONS",
    "INTERPOLATIONS",
    "BadImageError",
    "DataError",
    "EvalBatch",
    "EvalDataset",
    "ImageFolderDataset",
    "ListFileDataset",
    "Skipped",
    "build_eval_dataset",
    "collate_skip_bad",
    "eval_transform",
    "eval_transform_from_config",
    "interpolation_mode",
    "load_rgb",
]
