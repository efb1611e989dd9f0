"""The model of a training run, as its TrainConfig asks for it, and the input format it expects."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from snzoo import zoo
from snzoo._factory import create_model
from snzoo.errors import TrainingError, UnknownModelError
from snzoo.models import skeleton
from snzoo.weights import names_a_file
from snzoo.nn import drop_bn_branch, reopen_sparse_switchnorm, switchnorm_layers


def build_run_model(cfg, num_classes: int, log: Callable[[str], None]) -> nn.Module:
    """The run's model: created or loaded (--init), importance weights reset or SSN re-opened, BN branch dropped,
    parameters frozen, as the TrainConfig `cfg` says; `log` gets what was changed."""
    kwargs = dict(cfg.model_overrides)
    kwargs.setdefault("drop_rate", cfg.recipe.get("dropout", 0.0))
    _check_freeze(cfg)
    if cfg.init is None:
        model = create_model(cfg.name, num_classes=num_classes, **kwargs)
    elif names_a_file(cfg.init):  # a missing file fails as one, not as an unknown entry
        model = create_model(cfg.name, checkpoint_path=cfg.init, num_classes=num_classes, **kwargs)
    else:
        model = create_model(cfg.init, pretrained=True, num_classes=num_classes, **kwargs)
    if cfg.reset_importance:
        with torch.no_grad():
            for layer in switchnorm_layers(model):
                layer.mean_weight.fill_(1.0)
                layer.var_weight.fill_(1.0)
                for flag in ("mean_fixed", "var_fixed"):
                    if hasattr(layer, flag):
                        getattr(layer, flag).zero_()
    if cfg.reopen_ssn:
        reopened = reopen_sparse_switchnorm(model)
        log(f"--reopen-ssn: {reopened} Sparse SN layers had fixed one-hot importance weights; re-opened from the "
            "same selection")
    per_device = cfg.recipe["batch"]["per_device"]
    drop = cfg.drop_bn if cfg.drop_bn is not None else per_device == 1
    if drop:
        changed = drop_bn_branch(model)
        if changed:
            log(f"per-device batch {per_device}: BN statistics equal IN statistics there, so the BN term of "
                f"{changed} SN layers is dropped (using_bn=False), as the SN authors advise")
    for prefix in cfg.freeze:
        found = [p for n, p in model.named_parameters() if n == prefix or n.startswith(prefix + ".")]
        if not found:
            raise TrainingError(f"--freeze {prefix}: no parameters under that name (e.g. conv1, sn1, layer1)")
        for param in found:
            param.requires_grad_(False)
    return model


def _check_freeze(cfg) -> None:
    """Refuse unknown --freeze names on the architecture's skeleton, before any pretrained weights are fetched."""
    if not cfg.freeze:
        return
    names = [n for n, _ in skeleton(cfg.name.split(".")[0]).named_parameters()]
    for prefix in cfg.freeze:
        if not any(n == prefix or n.startswith(prefix + ".") for n in names):
            raise TrainingError(f"--freeze {prefix}: no parameters under that name (e.g. conv1, sn1, layer1)")


def input_format(cfg) -> tuple[int, Optional[tuple]]:
    """The model's input channels, and the normalisation of the entry it comes from (when there is one)."""
    source = cfg.init if cfg.init and not Path(cfg.init).is_file() else cfg.name
    try:
        entry = zoo.get_entry(source) if "." in source else None
    except UnknownModelError:
        entry = None
    arch = entry.architecture if entry else cfg.name.split(".")[0]
    in_chans = cfg.model_overrides.get("in_chans") or skeleton(arch).conv1.in_channels
    normalization = (tuple(entry.eval.mean), tuple(entry.eval.std)) if entry and len(entry.eval.mean) == in_chans else None
    return in_chans, normalization
