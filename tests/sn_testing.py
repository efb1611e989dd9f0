"""Helpers shared by the SN layer tests: tolerances, tensors as NumPy arrays, layers with non-trivial parameters."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from snzoo.nn import SwitchNorm1d

TOL64 = dict(rtol=1e-10, atol=1e-10)
TOL32 = dict(rtol=1e-4, atol=1e-4)
# the CPU kernel's float32 statistics and output against float64 on the same values: a few units of float32 rounding
TOL32_KERNEL = dict(rtol=2e-6, atol=2e-6)


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


def spread_input(shape, dtype: torch.dtype = torch.float64, seed: int = 0, mean: float = 0.3,
                 std: float = 1.0) -> torch.Tensor:
    """Gaussian input whose channels have different spreads (0.5 to 2 times std), so that IN, LN and BN statistics
    all differ."""
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    spread = torch.linspace(0.5, 2.0, c, dtype=torch.float64).reshape((1, c) + (1,) * (len(shape) - 2))
    return (torch.randn(shape, generator=g, dtype=torch.float64) * spread * std + mean).to(dtype)


def terms_of(layer: nn.Module) -> tuple[str, ...]:
    """The statistics a layer mixes, in the order of its importance weights."""
    if isinstance(layer, SwitchNorm1d):
        return ("ln", "bn")
    return ("in", "ln", "bn") if layer.using_bn else ("in", "ln")


def fashion_mnist_batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n real Fashion-MNIST test images (normalised, (n, 1, 28, 28)) and their labels."""
    from snzoo.data.fashion_mnist import FASHION_MNIST_MEAN, FASHION_MNIST_STD, fashion_mnist_dir, read_idx

    folder = fashion_mnist_dir()  # the Debian package dataset-fashion-mnist, which the Makefile installs
    images = np.array(read_idx(next(folder.glob("t10k-images*")))[:n], dtype=np.float32) / 255
    labels = np.array(read_idx(next(folder.glob("t10k-labels*")))[:n], dtype=np.int64)
    x = (torch.from_numpy(images)[:, None] - FASHION_MNIST_MEAN[0]) / FASHION_MNIST_STD[0]
    return x, torch.from_numpy(labels)
