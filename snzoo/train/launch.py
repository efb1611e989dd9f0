"""Python entry points of training: a zoo entry's recipe (with overrides) or a fine-tuning recipe, then train()."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Optional, Sequence

from snzoo import zoo
from snzoo.errors import UnknownModelError
from snzoo.models import get_architecture
from snzoo.train.engine import TrainConfig, train
from snzoo.train.recipe import RecipeError, load_override_file, resolve_recipe


def base_recipe(name: str, recipe_file: Optional[Path] = None) -> tuple[str, dict, Optional[Path]]:
    """(model name, base recipe, override file still to apply): an entry's recipe, an architecture's default
    entry's, or for an architecture without entries the recipe file itself."""
    try:
        entry = zoo.get_entry(name)
    except UnknownModelError:
        get_architecture(name)  # an unknown name fails here with suggestions
        if recipe_file is None:
            raise RecipeError(f"{name} has no zoo entry to take a recipe from; pass --recipe FILE with a full recipe") from None
        return name, load_override_file(recipe_file), None
    return entry.name, copy.deepcopy(entry.recipe), recipe_file


def _batch_override(batch: str) -> list[str]:
    match = re.fullmatch(r"(\d+)x(\d+)", batch)
    if not match:
        raise RecipeError(f"--batch {batch!r} is not DEVICESxPER_DEVICE, e.g. 8x2")
    return [f"batch.devices={match.group(1)}", f"batch.per_device={match.group(2)}"]


def train_entry(
    name: str,
    data: str,
    output: Path,
    *,
    recipe_file: Optional[Path] = None,
    overrides: Sequence[str] = (),
    epochs: Optional[int] = None,
    batch: Optional[str] = None,
    lr: Optional[float] = None,
    **options,
) -> dict:
    """Train `name` (a zoo entry reproduces its recipe) on `data`; options are TrainConfig fields."""
    model_name, recipe, override_file = base_recipe(name, recipe_file)
    extra = list(overrides)
    if epochs is not None:
        extra.append(f"epochs={epochs}")
    if batch is not None:
        extra += _batch_override(batch)
    if lr is not None:
        extra.append(f"lr.base={lr}")
    recipe = resolve_recipe(recipe, override_file, extra)
    return train(TrainConfig(name=model_name, recipe=recipe, data=data, output=Path(output), **options))


def finetune_recipe(recipe: dict, epochs: int, batch: str, lr: float, norm_decay: bool) -> dict:
    """The entry's recipe turned into a short fine-tuning one: cosine without warm-up from `lr`, no final phase."""
    tuned = copy.deepcopy(recipe)
    devices, per_device = (int(v) for v in batch.split("x"))
    tuned.update(epochs=epochs, batch={"devices": devices, "per_device": per_device},
                 lr={"base": lr, "reference_batch": devices * per_device},
                 schedule={"type": "cosine", "warmup_epochs": 0})
    tuned["augmentation"] = dict(tuned["augmentation"], final_phase=None)
    tuned["optimizer"] = dict(tuned["optimizer"], weight_decay_norm=norm_decay)
    return tuned


def task_finetune_recipe(task: str, epochs: Optional[int], batch: Optional[str], lr: Optional[float],
                         norm_decay: bool) -> dict:
    """The task's recipe (snzoo.tasks.TASK_RECIPES) with the fine-tune's batch, peak lr and length where given."""
    from snzoo.tasks import task_recipe

    recipe = task_recipe(task)
    if batch is not None:
        devices, per_device = (int(v) for v in batch.split("x"))
        recipe["batch"] = {"devices": devices, "per_device": per_device}
    if lr is not None:  # the peak lr of this batch, as for classification fine-tunes
        recipe["lr"] = {"base": lr, "reference_batch": recipe["batch"]["devices"] * recipe["batch"]["per_device"]}
    if epochs is not None:
        recipe.update(epochs=epochs, iterations=None)
    recipe["optimizer"]["weight_decay_norm"] = norm_decay
    return recipe


def finetune(
    name: str,
    data: str,
    output: Path,
    *,
    epochs: Optional[int] = 10,
    batch: Optional[str] = "1x32",
    lr: Optional[float] = 0.01,
    norm_decay: bool = True,
    overrides: Sequence[str] = (),
    task: str = "classification",
    model: Optional[str] = None,
    **options,
) -> dict:
    """Fine-tune the pretrained entry `name` on `data`.

    classification: a new head for the data's classes, the rest from the entry (cosine from `lr`, `epochs` long).
    detection / segmentation: the task model `model` (default: Faster R-CNN R-50-FPN SN, DeepLabV3 SN) on the
    entry's backbone, with the task's recipe (snzoo.tasks.TASK_RECIPES); `batch`, `lr` (the peak lr at that batch)
    and `epochs` replace the recipe's where given. `init=FILE` (in options) starts from that checkpoint instead of
    the entry's weights; `name` (an entry, or an architecture) says what the file holds.
    """
    if batch is not None:
        _batch_override(batch)
    if task == "classification":
        entry = zoo.get_entry(name)
        recipe = resolve_recipe(finetune_recipe(entry.recipe, epochs or 10, batch or "1x32", 0.01 if lr is None else lr,
                                                norm_decay), None, list(overrides))
        return train(TrainConfig(name=entry.architecture, recipe=recipe, data=data, output=Path(output),
                                 init=options.pop("init", None) or entry.name, **options))
    from snzoo.tasks import default_task_model, task_model_builder

    arch = get_architecture(zoo.get_entry(name).architecture if "." in name else name)
    model = model or default_task_model(task, arch.depth)
    task_model_builder(task, model)  # an unknown model fails before any data is read
    recipe = resolve_recipe(task_finetune_recipe(task, epochs, batch, lr, norm_decay), None, list(overrides))
    return train(TrainConfig(name=model, recipe=recipe, data=data, output=Path(output), task=task, backbone=name,
                             **options))
