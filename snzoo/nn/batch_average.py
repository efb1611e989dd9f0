"""The batch-average finaliser: turns accumulated batch statistics into running averages."""

from __future__ import annotations

import itertools
from typing import Iterable, Optional

import torch
from torch import nn

from snzoo.nn.switchnorm import _SwitchNorm


def batch_average_layers(model: nn.Module) -> list[_SwitchNorm]:
    """The SN layers of a model that keep batch-average (not moving-average) statistics."""
    return [m for m in model.modules() if isinstance(m, _SwitchNorm) and m.using_bn and not m.using_moving_average]


@torch.no_grad()
def finalize_batch_average(
    model: nn.Module,
    loader: Iterable,
    iterations: int = 200,
    device: Optional[torch.device] = None,
) -> int:
    """Recompute the running statistics of batch-average SN layers as the original helper does.

    Zeroes their running buffers, runs `iterations` batches of `loader` (the training set with eval transforms
    in the original recipe) through the model with those layers in train mode and no gradients, then sets
    running_mean = sum / n and running_var = sum_of_E[x^2] / n - running_mean^2. Every other module runs in
    eval mode, so moving-average statistics elsewhere stay untouched. Returns the number of batches used.
    """
    layers = batch_average_layers(model)
    if not layers:
        return 0
    was_training = {m: m.training for m in model.modules()}
    model.eval()
    for layer in layers:
        layer.reset_running_stats()
        layer.train()
    used = 0
    try:
        for batch in itertools.islice(loader, iterations):
            images = batch[0] if isinstance(batch, (list, tuple)) else batch
            model(images.to(device) if device is not None else images)
            used += 1
    finally:
        for module, mode in was_training.items():
            module.training = mode
    if used == 0:
        raise ValueError("finalize_batch_average got an empty loader; pass the training set with eval transforms")
    for layer in layers:
        layer.running_mean.div_(used)
        layer.running_var.div_(used).sub_(layer.running_mean.pow(2))
    return used
