"""The optimiser of a recipe: SGD with parameter groups for the norm layers and the importance weights."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from snzoo.nn import SparseSwitchNorm2d
from snzoo.nn.switchnorm import _SwitchNorm

NORM_TYPES = (_SwitchNorm, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)


def parameter_groups(model: nn.Module, recipe: Mapping) -> list[dict]:
    """Split parameters into groups with their weight decay and learning-rate scale (`lr_scale`).

    - weights of convolutions and the classifier: the recipe's weight decay;
    - norm gammas / betas and SN importance weights: decayed too when optimizer.weight_decay_norm (the SN
      recipes decay everything), else not;
    - SSN importance weights: lr x sparsestmax.importance_lr_scale and sparsestmax.importance_weight_decay.
    """
    opt = recipe["optimizer"]
    decay = float(opt.get("weight_decay", 0.0))
    norm_decay = decay if opt.get("weight_decay_norm", True) else 0.0
    ssn = recipe.get("sparsestmax") or {}
    groups = {
        "default": {"params": [], "weight_decay": decay, "lr_scale": 1.0},
        "norm": {"params": [], "weight_decay": norm_decay, "lr_scale": 1.0},
        "importance": {"params": [], "weight_decay": norm_decay, "lr_scale": 1.0},
        "sparse_importance": {"params": [], "weight_decay": float(ssn.get("importance_weight_decay", 0.0)),
                              "lr_scale": float(ssn.get("importance_lr_scale", 0.1))},
    }
    seen = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            if isinstance(module, SparseSwitchNorm2d) and name in ("mean_weight", "var_weight"):
                group = "sparse_importance"
            elif isinstance(module, _SwitchNorm) and name in ("mean_weight", "var_weight"):
                group = "importance"
            elif isinstance(module, NORM_TYPES):
                group = "norm"
            else:
                group = "default"
            groups[group]["params"].append(param)
    return [dict(g, name=n) for n, g in groups.items() if g["params"]]


def build_optimizer(model: nn.Module, recipe: Mapping) -> torch.optim.SGD:
    """SGD with the recipe's momentum and nesterov over `parameter_groups` (lr is set every iteration)."""
    opt = recipe["optimizer"]
    return torch.optim.SGD(parameter_groups(model, recipe), lr=0.0, momentum=float(opt.get("momentum", 0.9)),
                           nesterov=bool(opt.get("nesterov", False)))


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr to lr x its lr_scale."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def importance_parameters(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The SSN importance weights (the parameters the SSN recipe clips)."""
    return [p for g in optimizer.param_groups if g.get("name") == "sparse_importance" for p in g["params"]]
