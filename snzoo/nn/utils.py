"""Model-wide switches for SN layers: ghost batches, synchronised statistics, the SSN radius."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from snzoo.nn._checks import check_sync_or_ghost
from snzoo.nn.ghost_batchnorm import GhostBatchNorm2d
from snzoo.nn.sparse_switchnorm import SparseSwitchNorm2d
from snzoo.nn.switchnorm import _SwitchNorm


def switchnorm_layers(model: nn.Module) -> list[_SwitchNorm]:
    """Every SN layer (SwitchNorm1d/2d/3d, SyncSwitchNorm2d, SparseSwitchNorm2d) of a model, in module order."""
    return [m for m in model.modules() if isinstance(m, _SwitchNorm)]


def set_ghost_batch_size(model: nn.Module, ghost_batch_size: Optional[int]) -> int:
    """Compute BN statistics over groups of `ghost_batch_size` samples in every SN (and ghost BN) layer; None: off.

    A batch of N = d * k samples then behaves as d devices with k samples each and unsynchronised statistics.
    Returns the number of layers changed.
    """
    if ghost_batch_size is not None and ghost_batch_size < 1:
        raise ValueError(f"ghost_batch_size must be a positive integer or None, got {ghost_batch_size}")
    layers = switchnorm_layers(model)
    for layer in layers:
        check_sync_or_ghost(layer.process_group, ghost_batch_size)
    layers += [m for m in model.modules() if isinstance(m, GhostBatchNorm2d)]  # the BN baseline emulates devices too
    for layer in layers:
        layer.ghost_batch_size = ghost_batch_size
    return len(layers)


def convert_sync_switchnorm(model: nn.Module, process_group: Optional[object] = None) -> nn.Module:
    """Synchronise the BN statistics of every SN layer over `process_group` (None: the default group)."""
    for layer in switchnorm_layers(model):
        check_sync_or_ghost(True if process_group is None else process_group, layer.ghost_batch_size)
        layer.process_group = True if process_group is None else process_group
    return model


def set_sparsestmax_radius(model: nn.Module, radius: float) -> int:
    """Set the sparsestmax radius of every SSN layer; returns the number of layers changed."""
    layers = [m for m in model.modules() if isinstance(m, SparseSwitchNorm2d)]
    for layer in layers:
        layer.set_radius(radius)
    return len(layers)


def drop_bn_branch(model: nn.Module) -> int:
    """Remove the BN term of every SwitchNorm2d/3d layer (using_bn=False), keeping the IN and LN weights.

    The SN authors' advice for one image per device, where batch statistics are instance statistics. The raw IN
    and LN importance weights are kept, so their relative preference survives. Returns the layers changed.
    """
    from snzoo.nn.switchnorm import SwitchNorm1d

    changed = 0
    for layer in switchnorm_layers(model):
        if not layer.using_bn or isinstance(layer, (SparseSwitchNorm2d, SwitchNorm1d)):
            continue
        layer.mean_weight = nn.Parameter(layer.mean_weight.detach()[:2].clone())
        layer.var_weight = nn.Parameter(layer.var_weight.detach()[:2].clone())
        del layer._buffers["running_mean"], layer._buffers["running_var"]
        layer.using_bn = False
        changed += 1
    return changed


def reopen_sparse_switchnorm(model: nn.Module, margin: float = 1e-3, radius: float = 0.0) -> int:
    """Re-open the fixed one-hot importance weights of every SSN layer, so fine-tuning can choose again.

    A fixed vector gets its flag cleared and its raw weights set to (1 - margin) on the selected term and 0
    elsewhere: sparsemax of that keeps every term in the support (margin / 3 on each unselected one, 1 - 2 margin / 3
    on the selected), so the layer starts from the same selection, within `margin`, with a gradient on all three
    weights (an exact one-hot has none). The layer's radius is set to `radius` (0, the start of the SSN schedule, by
    default: a radius near 1 would push the weights straight back to the one-hot). Returns the layers re-opened.
    """
    if not 0.0 < margin < 1.0:
        raise ValueError(f"margin must be in (0, 1), got {margin}")
    reopened = 0
    with torch.no_grad():
        for layer in (m for m in model.modules() if isinstance(m, SparseSwitchNorm2d)):
            fixed = [(layer.mean_weight, layer.mean_fixed), (layer.var_weight, layer.var_fixed)]
            fixed = [(raw, flag) for raw, flag in fixed if bool(flag.item())]
            for raw, flag in fixed:
                selected = raw.argmax()
                raw.zero_()
                raw[selected] = 1.0 - margin
                flag.zero_()
            if fixed:
                layer.set_radius(radius)
                reopened += 1
    return reopened
