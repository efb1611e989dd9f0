"""Task models (detection, segmentation) by name, their training recipes, and their task entries.

A fine-tuned detector or segmenter is described by a task entry: the builder's name and arguments, the backbone it
started from, its classes, metrics, recipe and checksummed sources. `snzoo finetune --task` writes one as
`entry.json` beside the weights, in the manifest's format (its `task_entries` section), so it can join the zoo
as it is (`--manifest RUN_DIR/entry.json`, or copied into weights_manifest.json). The entry is enough to rebuild
the model and load the weights without fetching the backbone again:

    model, entry = snzoo.tasks.load_task_model("runs/det")                        # a run directory or entry.json
    model, entry = snzoo.tasks.load_task_model("fasterrcnn_resnet50_fpn_sn.coco_8x2_step180000it")   # a zoo name
"""

from __future__ import annotations

import copy
import fnmatch
import json
from pathlib import Path
from typing import Any, Callable, Optional, Union

from torch import nn

from snzoo import zoo
from snzoo.errors import CheckpointError, ModelConfigError, UnknownModelError
from snzoo.models.registry import unknown_name_message

TASKS = ("classification", "detection", "segmentation")
TASK_ENTRY_SCHEMA_VERSION = 1

# The recipes of the task models, as data (the classification recipes live in the zoo manifest's entries).
TASK_RECIPES: dict[str, dict] = {
    "detection": {
        "task": "detection",
        "model": "fasterrcnn_resnet50_fpn_sn",
        "iterations": 180000,
        "epochs": None,
        "batch": {"devices": 8, "per_device": 2},
        "optimizer": {"name": "sgd", "momentum": 0.9, "nesterov": False, "weight_decay": 1e-4,
                      "weight_decay_norm": True},
        "lr": {"base": 0.02, "reference_batch": 16},
        "schedule": {"type": "step", "milestone_iters": [120000, 160000], "gamma": 0.1,
                     "warmup_iters": 500, "warmup_factor": 1.0 / 3.0},
        "augmentation": {"hflip": 0.5},
        "model_kwargs": {"trainable_layers": 3, "min_size": 800, "max_size": 1333},
        "statistics": "per_device",
        "dropout": 0.0,
        "label_smoothing": 0.0,
        "notes": ["the SN detection release's 2x schedule (Detectron: SGD, lr 0.02 at 16 images, weight decay 1e-4, "
                  "180k iterations, x0.1 at 120k and 160k, linear warm-up from 1/3 over 500 iterations; 2 images "
                  "per device on 8 devices; short side 800, long side at most 1333; stem and res2 frozen)"],
    },
    "segmentation": {
        "task": "segmentation",
        "model": "deeplabv3_resnet50_sn",
        "epochs": 30,
        "batch": {"devices": 8, "per_device": 4},
        "optimizer": {"name": "sgd", "momentum": 0.9, "nesterov": False, "weight_decay": 1e-4,
                      "weight_decay_norm": True},
        "lr": {"base": 0.02, "reference_batch": 32},
        "schedule": {"type": "poly", "power": 0.9},
        "augmentation": {"crop": 480, "scale": [0.5, 2.0], "hflip": 0.5},
        "model_kwargs": {"output_stride": 8},
        "statistics": "per_device",
        "dropout": 0.0,
        "label_smoothing": 0.0,
        "notes": ["torchvision's DeepLabV3 reference recipe (SGD, lr 0.02 at 32 images, poly 0.9, weight decay "
                  "1e-4, 30 epochs, crops of 480); no SN segmentation recipe or checkpoint was published"],
    },
}


def task_models(task: str) -> dict[str, Callable[..., nn.Module]]:
    """The model builders of a task ("detection" or "segmentation") by name."""
    if task == "detection":
        from snzoo.detection import DETECTION_MODELS

        return DETECTION_MODELS
    if task == "segmentation":
        from snzoo.segmentation import SEGMENTATION_MODELS

        return SEGMENTATION_MODELS
    raise ModelConfigError(f"unknown task {task!r}; expected one of {', '.join(TASKS[1:])}")


def task_model_builder(task: str, name: str) -> Callable[..., nn.Module]:
    """The builder of task model `name`, or an error naming the known ones."""
    models = task_models(task)
    if name not in models:
        raise UnknownModelError(unknown_name_message(f"{task} model", name, models))
    return models[name]


def task_recipe(task: str) -> dict:
    """A copy of the task's recipe."""
    if task not in TASK_RECIPES:
        raise ModelConfigError(f"unknown task {task!r}; expected one of {', '.join(TASK_RECIPES)}")
    return copy.deepcopy(TASK_RECIPES[task])


def default_task_model(task: str, backbone_depth: Optional[int] = None) -> str:
    """The task model a fine-tune builds when none is named: the recipe's, with the backbone's depth for DeepLabV3."""
    name = TASK_RECIPES[task]["model"]
    if task == "segmentation" and backbone_depth == 101:
        return "deeplabv3_resnet101_sn"
    if backbone_depth not in (None, 50):
        name = {"detection": "fasterrcnn_resnet_fpn_sn", "segmentation": "deeplabv3_resnet_sn"}[task]
    return name


def task_entry(name: str, *, task: str, model: str, model_kwargs: dict, backbone: str, backbone_architecture: str,
               classes: list, weights: dict, metrics: dict, eval_config: dict, recipe: dict, notes: list) -> dict:
    """The entry of a fine-tuned task model as a manifest file holding it alone (`entry.json`): `backbone` is where
    training started (a zoo entry), `backbone_architecture` what the model is rebuilt from (with model_kwargs'
    using_bn)."""
    return {"schema_version": TASK_ENTRY_SCHEMA_VERSION, "entries": {}, "task_entries": {name: {
        "task": task, "model": model, "model_kwargs": model_kwargs, "backbone": backbone,
        "backbone_architecture": backbone_architecture,
        "num_classes": model_kwargs["num_classes"], "classes": classes, "sources": [weights], "metrics": metrics,
        "eval": eval_config, "recipe": recipe,
        "provenance": {"paper": "arXiv:1806.10779", "repository": "snzoo", "license": "Apache-2.0"}, "notes": notes,
    }}}


def list_task_entries(pattern: str = "*", task: Optional[str] = None) -> list[str]:
    """Sorted names of the zoo's task entries matching an fnmatch pattern (by name or model), of one task or all."""
    pattern = pattern.lower()
    return sorted(n for n, e in zoo.manifest().task_entries.items()
                  if (task is None or e["task"] == task)
                  and (fnmatch.fnmatchcase(n, pattern) or fnmatch.fnmatchcase(e["model"], pattern)))


def get_task_entry(name: str) -> dict:
    """The zoo's task entry `name` (MODEL.TAG), with its name under "name"."""
    entries = zoo.manifest().task_entries
    if name not in entries:
        raise UnknownModelError(unknown_name_message("task entry", name, entries))
    return dict(entries[name], name=name)


def read_task_entry(path: Union[str, Path]) -> tuple[str, dict, Path]:
    """(name, entry, folder) of a task entry file (a manifest holding one task entry), or of the entry.json inside
    a run directory; the file is validated as a manifest overlay."""
    path = Path(path)
    if path.is_dir():
        path = path / "entry.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: no task entry there; pass a fine-tuning run directory, its entry.json, or "
                              "the name of a task entry in the zoo")
    try:
        document = json.loads(path.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{path}: not a JSON task entry ({exc})") from None
    entries = document.get("task_entries") if isinstance(document, dict) else None
    if not isinstance(entries, dict) or len(entries) != 1:
        raise CheckpointError(f"{path}: a task entry file holds one entry under 'task_entries'; classification "
                              "entries are evaluated with `snzoo eval NAME` without --task")
    (name,) = entries
    entry = zoo.load_manifest(overlay=path).task_entries[name]  # the manifest's checks, one line per problem
    return name, entry, path.parent


def build_task_model(entry: dict, **overrides: Any) -> nn.Module:
    """The entry's model with random weights (the backbone is not fetched, and its zoo entry need not exist): the
    builder and its arguments on the backbone's architecture."""
    builder = task_model_builder(entry["task"], entry["model"])
    kwargs = {**entry["model_kwargs"], **overrides}
    return builder(backbone=entry.get("backbone_architecture", entry["backbone"]), pretrained_backbone=False, **kwargs)


def resolve_task_entry(source: Union[str, Path]) -> tuple[str, dict, Optional[Path]]:
    """(name, entry, folder of its entry file or None) of a run directory, an entry.json, or a zoo task entry name."""
    if isinstance(source, str) and "." in source and "/" not in source and not Path(source).exists():
        return source, get_task_entry(source), None
    return read_task_entry(source)


def _weights_file(name: str, entry: dict, folder: Optional[Path]) -> Path:
    """The entry's weights: beside its entry file (a run directory), else fetched into the cache and verified like
    any zoo weights (mirror, offline rule, checksums)."""
    from snzoo.weights import check_digests, fetch_file, hash_file

    source = zoo.Source(**entry["sources"][0])
    if folder is not None and (folder / source.file_name).is_file():
        weights = folder / source.file_name
        check_digests(hash_file(weights), source, f"the weights of {name}, {weights}")
        return weights
    return fetch_file(source, f"the weights of {name}")


def load_task_model(source: Union[str, Path], **overrides: Any) -> tuple[nn.Module, dict]:
    """(model with the entry's weights, entry) from a run directory, its entry.json, or the name of a task entry in
    the zoo; the weights' checksums are checked against the entry and every key and shape must match."""
    from snzoo.weights import read_state_dict

    name, entry, folder = resolve_task_entry(source)
    weights = _weights_file(name, entry, folder)
    model = build_task_model(entry, **overrides)
    state = read_state_dict(weights)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{weights} does not fit {entry['model']}: {len(missing)} missing keys (e.g. "
                              f"{missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})")
    model.task_entry = dict(entry, name=name)
    return model.eval(), dict(entry, name=name)


__all__ = [
    "TASKS", "TASK_RECIPES", "build_task_model", "default_task_model", "get_task_entry", "list_task_entries",
    "load_task_model", "read_task_entry", "resolve_task_entry", "task_entry", "task_model_builder", "task_models",
    "task_recipe",
]
