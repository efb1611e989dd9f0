"""Training recipes: the manifest's recipe of an entry, with overrides, resolved into one plain dict.

A recipe is data. It comes from a zoo entry (`weights_manifest.json`), may be overridden by a YAML or JSON
file and by command-line values (dotted keys: `schedule.type=step`, `batch.per_device=16`), and the resolved
recipe is written to the run directory so a run can be repeated exactly.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any, Mapping, Optional

from snzoo.errors import RecipeError

REQUIRED = ("epochs", "batch", "optimizer", "lr", "schedule", "augmentation", "dropout", "label_smoothing")


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text  # a bare word such as `cosine`


def apply_override(recipe: dict, dotted_key: str, value: Any) -> None:
    """Set recipe[a][b] = value for `a.b`; the parent must exist, the leaf may be new."""
    parts = dotted_key.split(".")
    node = recipe
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {} if node.get(part) is None else node[part]
            if not isinstance(node[part], dict):
                raise RecipeError(f"recipe override {dotted_key}: {part!r} is not a group of settings")
        node = node[part]
    node[parts[-1]] = value


def load_override_file(path: Path) -> dict:
    """A recipe override file: JSON, or YAML when PyYAML is installed."""
    text = Path(path).read_text()
    if Path(path).suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise RecipeError(f"{path}: reading YAML needs PyYAML (pip install pyyaml), or write the file as JSON") from None
        data = yaml.safe_load(text)
    else:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise RecipeError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe file must hold a mapping of settings")
    return data


def _merge(base: dict, update: Mapping) -> dict:
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def resolve_recipe(base: Mapping, override_file: Optional[Path] = None, overrides: Optional[list[str]] = None) -> dict:
    """The recipe to train: base, then the file's settings, then `key=value` overrides; checked for sense."""
    recipe = copy.deepcopy(dict(base))
    if override_file is not None:
        _merge(recipe, load_override_file(override_file))
    for item in overrides or []:
        if "=" not in item:
            raise RecipeError(f"recipe override {item!r} is not KEY=VALUE (e.g. schedule.type=step)")
        key, _, value = item.partition("=")
        apply_override(recipe, key.strip(), _parse_value(value.strip()))
    check_recipe(recipe)
    return recipe


def check_recipe(recipe: Mapping) -> None:
    """Raise RecipeError naming the first setting that cannot be trained."""
    missing = [k for k in REQUIRED if k not in recipe]
    if missing:
        raise RecipeError(f"recipe lacks {', '.join(missing)}")
    for group in ("batch", "optimizer", "lr", "schedule", "augmentation"):
        if not isinstance(recipe[group], Mapping):
            raise RecipeError(f"recipe {group} must be a group of settings (e.g. {group}.KEY=VALUE), "
                              f"got {recipe[group]!r}")
    iterations = recipe.get("iterations")
    if iterations is not None and not (_is_int(iterations) and iterations > 0):
        raise RecipeError(f"recipe iterations must be a positive integer (or absent), got {iterations!r}")
    if not (_is_int(recipe["epochs"]) and recipe["epochs"] > 0) and not (recipe["epochs"] is None and iterations):
        raise RecipeError(f"recipe epochs must be a positive integer (or null with iterations set), "
                          f"got {recipe['epochs']!r}")
    batch = recipe["batch"]
    for key in ("devices", "per_device"):
        if not (_is_int(batch.get(key)) and batch[key] > 0):
            raise RecipeError(f"recipe batch.{key} must be a positive integer, got {batch.get(key)!r}")
    schedule = recipe["schedule"]
    if schedule.get("type") not in ("cosine", "step", "poly"):
        raise RecipeError(f"recipe schedule.type must be 'cosine', 'step' or 'poly', got {schedule.get('type')!r}")
    if schedule["type"] == "step" and not (schedule.get("milestones") or schedule.get("milestone_iters")):
        raise RecipeError("recipe schedule.milestones (epochs, e.g. [30, 60, 90]) or schedule.milestone_iters "
                          "(iterations, e.g. [120000, 160000]) is needed for a step schedule")
    if recipe["optimizer"].get("name", "sgd") != "sgd":
        raise RecipeError(f"recipe optimizer.name {recipe['optimizer'].get('name')!r} is not supported; use 'sgd'")
    for key in ("base", "reference_batch"):
        value = recipe["lr"].get(key, 0)
        # NaN and inf pass a `<= 0` test and would only show as a non-finite loss after the first step.
        if not (_is_number(value) and math.isfinite(value) and value > 0):
            raise RecipeError(f"recipe lr.base and lr.reference_batch must be positive, finite numbers; "
                              f"lr.{key} is {value!r}")
    for key in ("dropout", "label_smoothing"):
        value = recipe[key]
        if not (_is_number(value) and 0 <= value < 1):
            raise RecipeError(f"recipe {key} must be a number in [0, 1), got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def total_batch(recipe: Mapping) -> int:
    """Images per optimisation step: devices x per-device batch."""
    return recipe["batch"]["devices"] * recipe["batch"]["per_device"]


def peak_learning_rate(recipe: Mapping) -> float:
    """The linear scaling rule: base lr x total batch / reference batch (0.1 at 256 for the SN recipes)."""
    return recipe["lr"]["base"] * total_batch(recipe) / recipe["lr"]["reference_batch"]
