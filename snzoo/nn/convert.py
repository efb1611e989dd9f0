"""Any model to SN: BatchNorm, SyncBatchNorm, FrozenBatchNorm2d, GroupNorm and InstanceNorm layers become SN layers.

`init="preserve"` sets the importance weights so that the converted model in eval computes what the source did:

- BN sources (BatchNorm1d/2d/3d, SyncBatchNorm, FrozenBatchNorm2d, timm's BatchNormAct2d...): raw weights +L on
  the BN term and -L on the k others (IN and LN; LN for SwitchNorm1d), L = ln(k / share) / 2 + 1e-4, so that the
  IN + LN share of the mean weights, and of the variance weights, is delta < share (share = 1e-6 by default). With the
  layer's running mean mu and variance sigma^2, eps, gamma, and SN's per-sample statistics at the input x
  (D_m = max |mean_t - mu|, D_v = max |var_t - sigma^2| over the terms t other than BN),
  in exact arithmetic, element by element,

      |y_SN - y_BN| <= |gamma| * delta * (D_m / s + |x - mu| * D_v / (2 s^3)),  s^2 = (1 - delta) (sigma^2 + eps).

  (The mixed mean moves from mu by at most delta * D_m, the mixed variance from sigma^2 by at most delta * D_v and
  stays above s^2.) This bounds each layer on its own input; through a network the differences propagate.
- GroupNorm with one group: LN; GroupNorm with one channel per group and InstanceNorm: IN (SwitchNorm1d has no IN
  term: InstanceNorm1d gets LN there, and the bound does not apply). Same +L / -L weights. SN's IN variance is the
  unbiased one of the original release, while GroupNorm and InstanceNorm divide by the element count, so the
  match is exact only up to that: over L spatial positions the IN variance is larger by L / (L - 1), the LN
  variance by mean_c(var_in) / (L - 1).
- Other GroupNorm group counts mix statistics SN does not have: they are not representable exactly and no bound
  applies. The group of G groups over C channels gets LN when its C / G channels are at least G (G^2 <= C; the
  group is nearer the whole layer than one channel in element count, on a log scale), else IN.

`init="uniform"`: the paper's start, all raw importance weights 1 (as SN's own reset_parameters).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import nn

from snzoo.nn._replace import replace_modules
from snzoo.nn.norm_act import SwitchNormAct2d
from snzoo.nn.switchnorm import SwitchNorm1d, SwitchNorm2d, SwitchNorm3d, SyncSwitchNorm2d, _SwitchNorm

INITS = ("preserve", "uniform")
PRESERVE_SHARE = 1e-6  # the IN + LN share left by init="preserve" (of the mean and of the variance weights)
# SN momentum weighs the old running value; sources without one (GroupNorm, FrozenBatchNorm2d, a cumulative
# BatchNorm) get the SN equivalent of PyTorch's default 0.1.
_DEFAULT_MOMENTUM = 0.9


class _Source(NamedTuple):
    kind: str  # "bn", "gn" or "in"
    rank: int  # 1, 2 or 3: SwitchNorm1d/2d/3d


def _is_frozen_bn(module: nn.Module) -> bool:
    """torchvision's FrozenBatchNorm2d and timm's FrozenBatchNorm2d / FrozenBatchNormAct2d (by their buffers: timm
    is optional, and neither is a BatchNorm subclass)."""
    buffers = ("weight", "bias", "running_mean", "running_var")
    return type(module).__name__.startswith("FrozenBatchNorm") and all(n in module._buffers for n in buffers)


def _source(module: nn.Module) -> Optional[_Source]:
    if isinstance(module, _SwitchNorm):
        return None
    if isinstance(module, (nn.SyncBatchNorm, nn.BatchNorm2d)) or _is_frozen_bn(module):
        return _Source("bn", 2)
    if isinstance(module, nn.BatchNorm1d):
        return _Source("bn", 1)
    if isinstance(module, nn.BatchNorm3d):
        return _Source("bn", 3)
    if isinstance(module, nn.GroupNorm):
        return _Source("gn", 2)
    for rank, cls in ((1, nn.InstanceNorm1d), (2, nn.InstanceNorm2d), (3, nn.InstanceNorm3d)):
        if isinstance(module, cls):
            return _Source("in", rank)
    return None


def _source_momentum(module: nn.Module) -> float:
    momentum = getattr(module, "momentum", None)
    return _DEFAULT_MOMENTUM if momentum is None else 1.0 - float(momentum)


def _new_layer(module: nn.Module, source: _Source, using_bn: bool, momentum: float) -> _SwitchNorm:
    channels = module.num_channels if source.kind == "gn" else getattr(module, "num_features", None)
    if channels is None:  # torchvision's FrozenBatchNorm2d does not keep it
        channels = module.running_mean.numel()
    eps = float(module.eps)
    act = module._modules.get("act")
    if source.rank == 1:
        return SwitchNorm1d(channels, eps, momentum)  # SwitchNorm1d always has its BN term
    if source.rank == 3:
        return SwitchNorm3d(channels, eps, momentum, using_bn=using_bn)
    if act is not None:  # timm's norm + activation layers: keep their dropout / drop-path and activation
        layer = SwitchNormAct2d(channels, eps, momentum, using_bn=using_bn, drop=module._modules.get("drop"), act=act)
    elif isinstance(module, nn.SyncBatchNorm):
        return SyncSwitchNorm2d(channels, eps, momentum, using_bn=using_bn, process_group=module.process_group)
    else:
        return SwitchNorm2d(channels, eps, momentum, using_bn=using_bn)
    if isinstance(module, nn.SyncBatchNorm):
        layer.process_group = True if module.process_group is None else module.process_group
    return layer


def _preserved_term(module: nn.Module, source: _Source) -> str:
    if source.kind == "bn":
        return "bn"
    if source.rank == 1:
        return "ln"
    if source.kind == "in":
        return "in"
    groups, channels = module.num_groups, module.num_channels
    if groups == channels:
        return "in"
    return "ln" if groups * groups <= channels else "in"


def _copy_state(layer: _SwitchNorm, module: nn.Module) -> None:
    with torch.no_grad():
        for name in ("weight", "bias"):
            value = getattr(module, name, None)
            if value is not None:
                getattr(layer, name).copy_(value.detach().reshape(getattr(layer, name).shape))
        running_mean, running_var = getattr(module, "running_mean", None), getattr(module, "running_var", None)
        if layer.using_bn and running_mean is not None and running_var is not None:
            layer.running_mean.copy_(running_mean.detach().reshape(layer.running_mean.shape))
            layer.running_var.copy_(running_var.detach().reshape(layer.running_var.shape))


def _set_preserving_weights(layer: _SwitchNorm, term: str, share: float) -> None:
    others = len(layer.terms) - 1
    # 1e-4 above ln(k / share) / 2: the share stays below `share` after float32 rounds the logits.
    logit = 0.5 * math.log(others / share) + 1e-4
    raw = torch.full((len(layer.terms),), -logit)
    raw[layer.terms.index(term)] = logit
    with torch.no_grad():
        layer.mean_weight.copy_(raw)
        layer.var_weight.copy_(raw)


def _convert_one(module: nn.Module, init: str, using_bn: bool, momentum: Optional[float], share: float):
    source = _source(module)
    if source is None:
        return None
    if any(isinstance(p, nn.parameter.UninitializedParameter) for p in module.parameters(recurse=False)):
        raise ValueError(f"{type(module).__name__} is a lazy layer not yet initialised; run one forward first")
    if init == "preserve" and source.kind == "bn":
        if source.rank != 1 and not using_bn:
            raise ValueError("init='preserve' of a BatchNorm needs the BN term; convert with using_bn=True")
        if getattr(module, "running_mean", None) is None:
            raise ValueError(
                f"init='preserve': {type(module).__name__} without running statistics normalises with batch "
                "statistics in eval, which SN's eval does not; use init='uniform'"
            )
    layer = _new_layer(module, source, using_bn, _source_momentum(module) if momentum is None else momentum)
    _copy_state(layer, module)
    if init == "preserve":
        _set_preserving_weights(layer, _preserved_term(module, source), share)
    reference = next(iter(list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))), None)
    if reference is not None:
        layer.to(device=reference.device, dtype=reference.dtype if reference.is_floating_point() else None)
    return layer.train(module.training)


def convert_to_switchnorm(
    module: nn.Module,
    init: str = "preserve",
    using_bn: bool = True,
    momentum: Optional[float] = None,
    share: float = PRESERVE_SHARE,
) -> nn.Module:
    """Replace every BatchNorm1d/2d/3d, SyncBatchNorm, FrozenBatchNorm2d, GroupNorm and InstanceNorm1d/2d/3d of
    `module` by the SN layer of its rank, in place; returns `module` (the new layer when `module` is one).

    Keeps eps, the affine parameters and the running statistics. BatchNorm1d and InstanceNorm1d become SwitchNorm1d
    (always with its BN term), the 3d layers SwitchNorm3d, the rest (GroupNorm and SyncBatchNorm included, whose
    rank the layer does not say) SwitchNorm2d; SyncBatchNorm keeps its process group (SyncSwitchNorm2d).
    timm's norm + activation layers become `SwitchNormAct2d`, which keeps their `drop` and `act` modules.
    `momentum` is SN's (the weight of the old value); None takes the source's (1 - its PyTorch momentum), or 0.9.
    SN layers already there are left alone. `init`: "preserve" (the source's eval output, within the bound of
    this module's docstring for BN sources: |dy| <= |gamma| delta (D_m / s + |x - mu| D_v / (2 s^3)),
    delta < `share`) or "uniform" (equal importance weights, the paper's start).
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if not 0.0 < share < 1.0:
        raise ValueError(f"share must be in (0, 1), got {share}")
    return replace_modules(module, lambda m: _convert_one(m, init, using_bn, momentum, share))


__all__ = ["INITS", "PRESERVE_SHARE", "convert_to_switchnorm"]
