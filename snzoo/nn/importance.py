"""The importance weights of SN layers: the IN / LN / BN mixing probabilities, from a model or a state dict."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Union

import torch
from torch import Tensor, nn

from snzoo.errors import CheckpointError
from snzoo.nn.sparsestmax import sparsestmax
from snzoo.nn.switchnorm import _SwitchNorm

# Names of the terms of a state dict's weight vector by its length (see importance_weights).
_TERMS_BY_COUNT = {3: ("in", "ln", "bn"), 2: ("in", "ln")}
# Wrappers that prefix module names: DistributedDataParallel / DataParallel and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def importance_weights(model_or_state_dict: Union[nn.Module, Mapping[str, Tensor]]) -> dict[str, dict]:
    """The mixing probabilities of every SN layer, in module order: {layer: {"terms", "mean", "var"}}.

    From a model: each layer's own `importance_weights()` (softmax, or sparsestmax for SSN layers), with
    the layer's own term names. From a state dict: softmax of `LAYER.mean_weight` / `LAYER.var_weight`
    (sparsestmax at the stored radius, or the fixed one-hot, when the layer has SSN's `radius` buffer).
    A state dict does not say which layer class wrote it, so 3 weights are named in, ln, bn and 2 are named
    in, ln (SwitchNorm2d/3d with using_bn=False); the LN and BN weights of a SwitchNorm1d read from a state
    dict are therefore mislabelled as in, ln. Pass the model to get SwitchNorm1d right.
    """
    if isinstance(model_or_state_dict, nn.Module):
        return _from_model(model_or_state_dict)
    if isinstance(model_or_state_dict, Mapping):
        return _from_state_dict(model_or_state_dict)
    raise TypeError(f"importance_weights takes a model or a state dict, got {type(model_or_state_dict).__name__}")


def _strip_wrappers(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        while name.startswith(prefix):
            name = name[len(prefix) :]
    return name


def _record(terms, mean: Tensor, var: Tensor) -> dict:
    return {"terms": list(terms), "mean": mean.detach().float().cpu().tolist(), "var": var.detach().float().cpu().tolist()}


def _from_model(model: nn.Module) -> dict[str, dict]:
    weights = {}
    # no_grad: an SSN layer in training mode would otherwise fix its one-hot weights as a side effect.
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, _SwitchNorm):
                mean, var = module.importance_weights()
                weights[_strip_wrappers(name)] = _record(module.terms, mean, var)
    return weights


def _from_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, dict]:
    weights = {}
    for key in state_dict:
        if key != "mean_weight" and not key.endswith(".mean_weight"):
            continue
        prefix = key[: -len("mean_weight")]
        var_key = prefix + "var_weight"
        if var_key not in state_dict:
            raise CheckpointError(f"state dict has {key} but no {var_key}; it is not from an SN layer")
        raw = {"mean": state_dict[key].detach().float().reshape(-1), "var": state_dict[var_key].detach().float().reshape(-1)}
        terms = _TERMS_BY_COUNT.get(raw["mean"].numel())
        if terms is None or raw["var"].numel() != raw["mean"].numel():
            raise CheckpointError(
                f"{key} has {raw['mean'].numel()} and {var_key} {raw['var'].numel()} weights; SN layers have 2 or 3"
            )
        probs = {}
        for stat in ("mean", "var"):
            radius, fixed = state_dict.get(prefix + "radius"), state_dict.get(f"{prefix}{stat}_fixed")
            if fixed is not None and bool(fixed.reshape(-1)[0]):
                probs[stat] = torch.nn.functional.one_hot(raw[stat].argmax(), raw[stat].numel()).float()
            elif radius is not None:
                probs[stat] = sparsestmax(raw[stat], float(radius.reshape(-1)[0]))
            else:
                probs[stat] = torch.softmax(raw[stat], 0)
        weights[_strip_wrappers(prefix.rstrip("."))] = _record(terms, probs["mean"], probs["var"])
    return weights
