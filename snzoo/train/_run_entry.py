"""The end of a run: canonical safetensors weights, their digests, and a manifest-ready zoo entry."""

from __future__ import annotations

import json
import re
from pathlib import Path

from torch import nn

from snzoo import zoo
from snzoo._io import atomic_write_text
from snzoo.data.fashion_mnist import FASHION_MNIST
from snzoo._torch_utils import input_channels
from snzoo.models import check_state_dict
from snzoo.errors import TrainingError
from snzoo.zoo import manifest_schema
from snzoo.nn import switchnorm_layers
from snzoo.version import __version__
from snzoo.weights import read_state_dict, write_safetensors

PROVENANCE = {"paper": "arXiv:1806.10779", "repository": "snzoo", "license": "Apache-2.0"}


def check_entry_name(name: str) -> None:
    """Raise TrainingError unless name is a valid ARCH.TAG: checked before a run, not after it has trained."""
    # The schema's own pattern: the name must pass the manifest check that ends the run.
    pattern = manifest_schema()["properties"]["entries"]["propertyNames"]["pattern"]
    if not re.match(pattern, name):
        raise TrainingError(f"--name {name!r} is not a valid entry name; expected ARCH.TAG in lowercase letters, "
                            "digits and underscores, e.g. resnet20_sn.mydata_1x32_cos10")


def default_entry_name(cfg, data) -> str:
    """ARCH.TAG for the trained weights: the entry trained, or dataset_batch_schedule-epochs."""
    if "." in cfg.name and cfg.init is None:
        return cfg.name
    arch = cfg.name.split(".")[0]
    recipe = cfg.recipe
    dataset = "fmnist" if data.val_name.startswith(FASHION_MNIST) else "".join(
        c if c.isalnum() else "_" for c in data.val_name.lower().removesuffix("-val"))
    schedule = "cos" if recipe["schedule"]["type"] == "cosine" else "step"
    tag = f"{dataset}_{recipe['batch']['devices']}x{recipe['batch']['per_device']}_{schedule}{recipe['epochs']}"
    return f"{arch}.{tag}" + ("_ft" if cfg.init else "")


def norm_config(model: nn.Module) -> dict:
    """The model's norm settings as the manifest records them (using_bn as the layers are now)."""
    config = dict(getattr(model, "norm_config", {}))
    layers = switchnorm_layers(model)
    if layers:
        config["using_bn"] = any(layer.using_bn for layer in layers)
    return config


def export_run(run_dir: Path, model: nn.Module, cfg, data, val_metrics: dict) -> dict:
    """Write RUN_DIR/ENTRY.safetensors and RUN_DIR/entry.json (one copy away from the manifest)."""
    name = cfg.entry_name or default_entry_name(cfg, data)
    arch = name.split(".")[0]
    weights = Path(run_dir) / f"{name}.safetensors"
    digests = write_safetensors(model.state_dict(), weights, {"entry": name, "snzoo_version": __version__, "format": "pt"})
    metrics = {val_metrics["dataset"]: {"top1": round(val_metrics["top1"], 2), "top5": round(val_metrics["top5"], 2)}} \
        if val_metrics else {data.val_name: {"top1": None, "top5": None}}
    shipped = zoo.load_manifest()  # the entry is checked against the shipped manifest
    same = shipped.entries.get(name)
    default = same.default if same is not None else not shipped.entries_for(arch)
    entry = {
        "architecture": arch,
        "default": default,
        "norm": norm_config(model),
        "num_classes": model.num_classes,
        "sources": [{"url": weights.resolve().as_uri(), "kind": "file", "format": "safetensors",
                     "file_name": weights.name, "sha256": digests.sha256, "md5": digests.md5, "size": digests.size}],
        "metrics": metrics,
        "eval": data.eval_config,
        "recipe": cfg.recipe,
        "provenance": PROVENANCE,
        "notes": [f"trained by `snzoo train` from {cfg.name}" + (f", initialised from {cfg.init}" if cfg.init else "")],
    }
    path = Path(run_dir) / "entry.json"
    path.write_text(json.dumps({"schema_version": 1, "entries": {name: entry}}, indent=2) + "\n")
    # Manifest-ready means it validates, and its weights load into the entry's architecture built with the entry's
    # arguments (and the run's input channels, which a manifest entry does not record).
    written = zoo.load_manifest(overlay=path).entries[name]
    check_state_dict(read_state_dict(weights), arch, str(weights), **written.model_kwargs(),
                     in_chans=input_channels(model))
    return {"entry_name": name, "weights": str(weights), "sha256": digests.sha256, "entry": str(path)}


def _task_tag(cfg, data) -> str:
    recipe = cfg.recipe
    dataset = "".join(c if c.isalnum() else "_" for c in data.val_name.lower().removesuffix("-val"))
    schedule = {"cosine": "cos", "step": "step", "poly": "poly"}[recipe["schedule"]["type"]]
    length = f"{recipe['iterations']}it" if recipe.get("iterations") else str(recipe["epochs"])
    return f"{dataset}_{recipe['batch']['devices']}x{recipe['batch']['per_device']}_{schedule}{length}"


def export_task_run(run_dir: Path, model: nn.Module, cfg, data, val_metrics: dict, *, task: str, backbone: str,
                    model_kwargs: dict) -> dict:
    """Write RUN_DIR/NAME.safetensors and RUN_DIR/entry.json for a detection or segmentation model: everything
    `snzoo.tasks.load_task_model` needs to rebuild it and check its weights."""
    from snzoo.tasks import load_task_model, task_entry

    name = cfg.entry_name or f"{cfg.name}.{_task_tag(cfg, data)}"
    weights = Path(run_dir) / f"{name}.safetensors"
    digests = write_safetensors(model.state_dict(), weights, {"entry": name, "task": task,
                                                              "snzoo_version": __version__, "format": "pt"})
    metrics = {k: v for k, v in val_metrics.items() if k != "dataset"}
    architecture = zoo.get_entry(backbone).architecture if "." in backbone else backbone
    document = task_entry(
        name, task=task, model=cfg.name, model_kwargs=model_kwargs, backbone=backbone,
        backbone_architecture=architecture, classes=list(data.classes),
        weights={"url": weights.resolve().as_uri(), "kind": "file", "format": "safetensors", "file_name": weights.name,
                 "sha256": digests.sha256, "md5": digests.md5, "size": digests.size},
        metrics={data.val_name: metrics} if val_metrics else {}, eval_config=data.eval_config, recipe=cfg.recipe,
        notes=[f"fine-tuned by `snzoo finetune --task {task}` from {backbone}"
               + (f" (weights {cfg.init})" if cfg.init and cfg.init != backbone else "")])
    path = Path(run_dir) / "entry.json"
    atomic_write_text(path, json.dumps(document, indent=2) + "\n")
    load_task_model(path)  # the entry rebuilds the model and its weights fit, or the run fails here
    return {"entry_name": name, "weights": str(weights), "sha256": digests.sha256, "entry": str(path)}
