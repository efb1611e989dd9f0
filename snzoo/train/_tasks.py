"""What the training loop does differently per task: data, model, loss, validation and the exported entry.

The loop itself (snzoo.train.engine) is the same for every task: processes, batch plan, ghost batches or
synchronised statistics, schedule, checkpoints and resume, non-finite handling, logs. A task supplies the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from snzoo import zoo
from snzoo.errors import DataError, TrainingError, UnknownModelError
from snzoo.eval.engine import evaluate
from snzoo.nn import switchnorm_layers
from snzoo.train._model import build_run_model, input_format
from snzoo.train._run_entry import export_run, export_task_run
from snzoo.train.data import TrainData, _first, build_train_data
from snzoo.weights import names_a_file


def _split(value: Any, parts: int) -> list:
    if parts == 1:
        return [value]
    if isinstance(value, torch.Tensor):
        return list(value.chunk(parts))
    size = len(value) // parts
    return [value[i * size:(i + 1) * size] for i in range(parts)]


@dataclass(frozen=True)
class Validation:
    """One validation: the metrics kept in the summary and the entry, the scalars logged, the line printed."""

    metrics: dict
    scalars: dict
    line: str


class Task:
    """A task's part of training; the defaults hold for batches of image tensors with tensor targets."""

    name = ""

    def build_data(self, cfg) -> TrainData:
        """The run's data sets (a TrainData), from cfg.data."""
        raise NotImplementedError

    def build_model(self, cfg, num_classes: int, log: Callable[[str], None]) -> nn.Module:
        """The run's model, with its pretrained weights where the run starts from some."""
        raise NotImplementedError

    def ghost_scope(self, model: nn.Module) -> nn.Module:
        """The part of the model whose batch dimension is the images (where ghost batches emulate devices)."""
        return model

    def to_device(self, inputs, targets, device: torch.device, memory_format: torch.memory_format):
        """A loader batch on the run's device."""
        return (inputs.to(device, non_blocking=True, memory_format=memory_format),
                targets.to(device, non_blocking=True))

    def split(self, inputs, targets, parts: int) -> list:
        """A step's batch as `parts` micro-batches of whole devices."""
        return list(zip(_split(inputs, parts), _split(targets, parts)))

    def loss(self, net: nn.Module, inputs, targets, recipe: dict) -> torch.Tensor:
        """The micro-batch's loss."""
        raise NotImplementedError

    def validate(self, model: nn.Module, data: TrainData, batch_size: int, workers: int,
                 device: torch.device) -> Validation:
        """Metrics of the model on data.val (rank 0, at epoch ends)."""
        raise NotImplementedError

    def export(self, run_dir: Path, model: nn.Module, cfg, data: TrainData, val_metrics: dict) -> dict:
        """The run's weights and entry, written to run_dir."""
        raise NotImplementedError


class ClassificationTask(Task):
    """Images and class labels; cross entropy; top-1 / top-5."""

    name = "classification"

    def build_data(self, cfg) -> TrainData:
        in_chans, normalization = input_format(cfg)
        return build_train_data(cfg.data, cfg.recipe, seed=cfg.seed, subset=cfg.subset, val_subset=cfg.val_subset,
                                in_chans=in_chans, normalization=normalization)

    def build_model(self, cfg, num_classes: int, log: Callable[[str], None]) -> nn.Module:
        return build_run_model(cfg, num_classes, log)

    def loss(self, net: nn.Module, inputs, targets, recipe: dict) -> torch.Tensor:
        return F.cross_entropy(net(inputs), targets, label_smoothing=recipe.get("label_smoothing", 0.0))

    def validate(self, model: nn.Module, data: TrainData, batch_size: int, workers: int,
                 device: torch.device) -> Validation:
        result = evaluate(model, data.val, batch_size=max(batch_size, 64), workers=workers, device=device,
                          progress=False, name="val")
        return Validation({"dataset": data.val_name, "top1": result.top1, "top5": result.top5, "n": result.n},
                          {"top1": result.top1, "top5": result.top5},
                          f"val top-1 {result.top1:.2f} top-5 {result.top5:.2f} ({result.n} images)")

    def export(self, run_dir: Path, model: nn.Module, cfg, data: TrainData, val_metrics: dict) -> dict:
        return export_run(run_dir, model, cfg, data, val_metrics)


class _TaskModelTask(Task):
    """Shared by detection and segmentation: a task model built on a backbone entry, exported as a task entry."""

    def backbone_source(self, cfg) -> tuple[str, Optional[str]]:
        """(backbone entry or architecture, checkpoint file or None) of the run."""
        if cfg.init is not None and names_a_file(cfg.init):
            if not cfg.backbone:
                raise TrainingError("--init FILE for a task model needs the backbone's entry or architecture as NAME")
            return cfg.backbone, cfg.init
        return cfg.init or cfg.backbone, None

    def model_kwargs(self, cfg, num_classes: int) -> dict:
        """The builder's arguments (recorded in the exported entry): the recipe's, the classes, the BN-term rule."""
        kwargs = {**cfg.recipe.get("model_kwargs", {}), **cfg.model_overrides, "num_classes": num_classes}
        per_device = cfg.recipe["batch"]["per_device"]
        if cfg.drop_bn or (cfg.drop_bn is None and per_device == 1):
            kwargs["using_bn"] = False  # one image per device: BN statistics are IN statistics (the (8,1) configs)
        return kwargs

    def build_model(self, cfg, num_classes: int, log: Callable[[str], None]) -> nn.Module:
        from snzoo.tasks import task_model_builder

        builder = task_model_builder(self.name, cfg.name)
        backbone, checkpoint = self.backbone_source(cfg)
        kwargs = self.model_kwargs(cfg, num_classes)
        if kwargs.get("using_bn") is False:
            log(f"per-device batch {cfg.recipe['batch']['per_device']}: SN layers without the BN term "
                "(using_bn=False) in the backbone, neck and heads")
        return builder(backbone=backbone, pretrained_backbone=checkpoint is None, backbone_checkpoint=checkpoint,
                       **kwargs)

    def normalization(self, cfg) -> tuple[list, list]:
        """The backbone entry's mean and std (ImageNet's when it has none)."""
        backbone, _ = self.backbone_source(cfg)
        try:
            entry = zoo.get_entry(backbone) if "." in backbone else None
        except UnknownModelError:
            entry = None
        from snzoo.data.transforms import IMAGENET_MEAN, IMAGENET_STD

        return (list(entry.eval.mean), list(entry.eval.std)) if entry else (list(IMAGENET_MEAN), list(IMAGENET_STD))

    def export(self, run_dir: Path, model: nn.Module, cfg, data: TrainData, val_metrics: dict) -> dict:
        backbone, _ = self.backbone_source(cfg)
        kwargs = self.model_kwargs(cfg, data.num_classes)
        # Recorded as built, so the entry rebuilds the model from the backbone's architecture alone.
        kwargs["using_bn"] = any(layer.using_bn for layer in switchnorm_layers(model))
        return export_task_run(run_dir, model, cfg, data, val_metrics, task=self.name, backbone=backbone,
                               model_kwargs=kwargs)


def _check_folder(data: str, what: str) -> Path:
    root = Path(data)
    if not root.is_dir():
        raise DataError(f"--data {data}: no such folder; {what}")
    return root


class DetectionTask(_TaskModelTask):
    """COCO-format folders; the detector's own losses (RPN and RoI heads); COCO box (and mask) AP."""

    name = "detection"
    layout = "a COCO-format folder: annotations/instances_train*.json with train*/ images (and the same for val)"

    def build_data(self, cfg) -> TrainData:
        from snzoo.data import CocoDetection, SeededPairAugmentation, collate_detection
        from snzoo.data import detection_eval_transform, detection_train_transform

        root = _check_folder(cfg.data, f"expected {self.layout}")
        train = CocoDetection(root, "train")
        try:
            val = CocoDetection(root, "val", transform=detection_eval_transform())
        except DataError:
            val = None  # no val split: the run trains without validation
        augmentation = detection_train_transform()
        names = [train.categories.get(i, "") for i in range(train.num_classes)]
        return TrainData(train=SeededPairAugmentation(_first(train, cfg.subset), augmentation, cfg.seed),
                         train_transform=augmentation, final_transform=None, train_eval=None,
                         # The COCO evaluation needs the whole data set (its annotations): a limit, not a subset.
                         val=val, val_limit=cfg.val_subset, val_name=f"{root.name}-val",
                         num_classes=train.num_classes, classes=names,
                         eval_config={"dataset": f"{root.name}-val", "metric": "coco"}, collate=collate_detection)

    def ghost_scope(self, model: nn.Module) -> nn.Module:
        # Ghost batches split the batch dimension: only the backbone and FPN see one row per image.
        return model.backbone

    def to_device(self, inputs, targets, device: torch.device, memory_format: torch.memory_format):
        return ([image.to(device, non_blocking=True) for image in inputs],
                [{k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in t.items()}
                 for t in targets])

    def loss(self, net: nn.Module, inputs, targets, recipe: dict) -> torch.Tensor:
        return sum(net(inputs, targets).values())

    def validate(self, model: nn.Module, data: TrainData, batch_size: int, workers: int,
                 device: torch.device) -> Validation:
        from snzoo.eval import evaluate_detection

        result = evaluate_detection(model, data.val, batch_size=batch_size, device=device, workers=workers,
                                    limit=data.val_limit, progress=False)
        metrics = {"dataset": data.val_name, "n": result.n, "box": result.box}
        scalars = {"box_AP": result.box["AP"], "box_AP50": result.box["AP50"]}
        line = f"val box AP {result.box['AP']:.2f} AP50 {result.box['AP50']:.2f}"
        if result.mask is not None:
            metrics["mask"] = result.mask
            scalars.update(mask_AP=result.mask["AP"], mask_AP50=result.mask["AP50"])
            line += f", mask AP {result.mask['AP']:.2f}"
        return Validation(metrics, scalars, f"{line} ({result.n} images)")


class SegmentationTask(_TaskModelTask):
    """Images with index masks (VOC-style folders); per-pixel cross entropy (255 ignored); mIoU."""

    name = "segmentation"
    layout = ("a VOC-style folder (JPEGImages/, SegmentationClass/, ImageSets/Segmentation/train.txt and val.txt) "
              "or images/ + masks/ with train.txt and val.txt")

    def build_data(self, cfg) -> TrainData:
        from snzoo.data import SeededPairAugmentation, SegmentationFolder
        from snzoo.data import segmentation_eval_transform, segmentation_train_transform

        root = _check_folder(cfg.data, f"expected {self.layout}")
        aug = cfg.recipe["augmentation"]
        mean, std = self.normalization(cfg)
        train = SegmentationFolder(root, "train", num_classes=cfg.num_classes)
        try:
            val = SegmentationFolder(root, "val", transform=segmentation_eval_transform(mean, std),
                                     num_classes=train.num_classes)
        except DataError:
            val = None
        augmentation = segmentation_train_transform(aug.get("crop", 480), mean, std,
                                                    scale=tuple(aug.get("scale", (0.5, 2.0))))
        return TrainData(train=SeededPairAugmentation(_first(train, cfg.subset), augmentation, cfg.seed),
                         train_transform=augmentation, final_transform=None, train_eval=None,
                         val=_first(val, cfg.val_subset) if val is not None else None, val_name=f"{root.name}-val",
                         num_classes=train.num_classes, classes=list(train.classes),
                         eval_config={"dataset": f"{root.name}-val", "metric": "miou", "mean": mean, "std": std})

    def loss(self, net: nn.Module, inputs, targets, recipe: dict) -> torch.Tensor:
        output = net(inputs)
        losses = F.cross_entropy(output["out"], targets, ignore_index=255)
        if "aux" in output:
            losses = losses + 0.5 * F.cross_entropy(output["aux"], targets, ignore_index=255)
        return losses

    def validate(self, model: nn.Module, data: TrainData, batch_size: int, workers: int,
                 device: torch.device) -> Validation:
        from snzoo.eval import evaluate_segmentation

        result = evaluate_segmentation(model, data.val, data.num_classes, device=device, workers=workers,
                                       progress=False)
        scores = result.to_dict()  # a class absent from the val images has no IoU: null, not NaN, in the summary
        metrics = {"dataset": data.val_name, "n": result.n, "miou": scores["miou"],
                   "pixel_accuracy": scores["pixel_accuracy"], "per_class_iou": scores["per_class_iou"]}
        return Validation(metrics, {"miou": result.miou, "pixel_accuracy": result.pixel_accuracy},
                          f"val mIoU {result.miou:.2f} pixel accuracy {result.pixel_accuracy:.2f} ({result.n} images)")


TASK_ADAPTERS = {t.name: t for t in (ClassificationTask(), DetectionTask(), SegmentationTask())}


def task_adapter(name: str) -> Task:
    """The training adapter of a task name."""
    if name not in TASK_ADAPTERS:
        raise TrainingError(f"unknown task {name!r}; expected one of {', '.join(TASK_ADAPTERS)}")
    return TASK_ADAPTERS[name]
