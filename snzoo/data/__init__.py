"""Data: image decoding, the 1-crop transform, ImageNet val in every layout users hold it in, and the task data of
detection (COCO-format folders) and segmentation (VOC-style folders) with their paired transforms."""

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
from snzoo.data.augment import SeededPairAugmentation
from snzoo.data.coco import CocoDetection, collate_detection
from snzoo.data.pair_transforms import (
    SEGMENTATION_IGNORE,
    detection_eval_transform,
    detection_train_transform,
    segmentation_eval_transform,
    segmentation_train_transform,
)
from snzoo.data.segmentation import SegmentationFolder
from snzoo.data.encoded import EncodedImageDataset, imagenet_classes, sample_file_name
from snzoo.data.hf_datasets import HFImageDataset
from snzoo.data.ilsvrc_devkit import DevkitLabels, read_devkit
from snzoo.data.ilsvrc_val import ILSVRCValArchive, ILSVRCValFolder
from snzoo.data.decoders import DECODERS
from snzoo.data.layouts import PREFIXES as LAYOUT_PREFIXES, detect_layout, open_imagenet_val
from snzoo.data.wds_shards import WebDatasetShards
from snzoo.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    INTERPOLATIONS,
    eval_transform,
    eval_transform_from_config,
    eval_uint8_transform_from_config,
    BatchNormalize,
    interpolation_mode,
)

__all__ = [
    "DECODERS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMG_EXTENSIONS",
    "INTERPOLATIONS",
    "BadImageError",
    "CocoDetection",
    "SEGMENTATION_IGNORE",
    "SeededPairAugmentation",
    "SegmentationFolder",
    "collate_detection",
    "detection_eval_transform",
    "detection_train_transform",
    "segmentation_eval_transform",
    "segmentation_train_transform",
    "DataError",
    "DevkitLabels",
    "EncodedImageDataset",
    "EvalBatch",
    "EvalDataset",
    "HFImageDataset",
    "ILSVRCValArchive",
    "ILSVRCValFolder",
    "ImageFolderDataset",
    "ListFileDataset",
    "Skipped",
    "WebDatasetShards",
    "build_eval_dataset",
    "collate_skip_bad",
    "eval_transform",
    "eval_transform_from_config",
    "eval_uint8_transform_from_config",
    "BatchNormalize",
    "imagenet_classes",
    "interpolation_mode",
    "load_rgb",
    "LAYOUT_PREFIXES",
    "detect_layout",
    "open_imagenet_val",
    "read_devkit",
    "sample_file_name",
]
