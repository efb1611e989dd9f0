"""Helpers shared by the SN layer tests: tolerances, tensors as NumPy arrays, layers with non-trivial parameters."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from snzoo.nn import SwitchNorm1d

TOL64 = dict(rtol=1e-10, atol=1e-10)
TOL32 = dict(rtol=1e-4, atol=1e-4)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A float64 NumPy copy of t."""
    return t.detach().cpu().double().numpy().copy()


def randomise(layer: nn.Module, seed: int = 0, buffers: bool = False) -> nn.Module:
    """Non-trivial gamma, beta and importance weights (and running buffers with buffers=True), so that every term
    of the mix matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (layer.weight, layer.bias, layer.mean_weight, layer.var_weight):
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
        layer.weight.add_(1.0)
        if buffers and layer.using_bn:
            layer.running_mean.copy_(torch.randn(layer.running_mean.shape, generator=g, dtype=torch.float64))
            layer.running_var.copy_(torch.rand(layer.running_var.shape, generator=g, dtype=torch.float64) + 0.5)
    return layer


def terms_of(layer: nn.Module) -> tuple[str, ...]:
    """The statistics a layer mixes, in the order of its importance weights."""
    if isinstance(layer, SwitchNorm1d):
        return ("ln", "bn")
    return ("in", "ln", "bn") if layer.using_bn else ("in", "ln")
