"""Gradient accumulation: the running statistics of a step split into micro-batches, as the full batch's."""

from __future__ import annotations

import torch
from torch import nn

from snzoo.nn.switchnorm import _SwitchNorm

_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


class StepStatistics:
    """Running statistics over a step's micro-batches as the full batch in one forward would leave them.

    The full batch updates each buffer once, with the mean of its (emulated) devices' updates; micro-batches in
    sequence would update it once each, applying the momentum accum_steps times a step. So every micro-batch
    starts from the step's values and the step keeps the mean of their updates (micro-batches hold equally many
    devices); counters, the same after each micro-batch, are kept as they are.
    """

    def __init__(self, model: nn.Module, micro_batches: int) -> None:
        self.micro_batches = micro_batches
        norms = [m for m in model.modules() if isinstance(m, (_SwitchNorm, nn.modules.batchnorm._BatchNorm))]
        self.buffers = [b for m in norms for b in (getattr(m, name, None) for name in _STATISTICS) if b is not None]
        self.start = [b.clone() for b in self.buffers]
        self.change = [torch.zeros_like(b) if b.is_floating_point() else None for b in self.buffers]

    @torch.no_grad()
    def micro_batch_done(self, last: bool) -> None:
        """Call after each micro-batch's backward (which may still read the buffers), last=True after the last."""
        for buffer, start, change in zip(self.buffers, self.start, self.change):
            if change is not None:
                change.add_(buffer - start)
                if last:
                    buffer.copy_(start + change / self.micro_batches)
            if not last:
                buffer.copy_(start)
