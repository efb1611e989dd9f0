"""BatchNorm2d with ghost batches: the BN baseline under the same device emulation as SN."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from snzoo.nn._checks import ghost_group_size


class GhostBatchNorm2d(nn.BatchNorm2d):
    """torch BatchNorm2d whose training statistics can be taken over groups of `ghost_batch_size` samples.

    A batch of N = d * k images then normalises as d devices with k images each and unsynchronised statistics;
    the running statistics get the mean of the d per-group updates (what the per-device buffers average to).
    Without ghost batches (or in eval) it is exactly nn.BatchNorm2d, with the same state_dict.
    """

    ghost_batch_size: Optional[int] = None

    def forward(self, x: Tensor) -> Tensor:
        k = self.ghost_batch_size
        if not self.training or k is None or k >= x.shape[0]:
            return super().forward(x)
        n, c = x.shape[0], x.shape[1]
        ghost_group_size(n, k)
        groups = n // k
        spatial = x.shape[2:]
        # Each group's channels become channels of their own, so one batch_norm call normalises every group.
        grouped = x.reshape(groups, k, c, *spatial).transpose(0, 1).reshape(k, groups * c, *spatial)
        weight = self.weight.repeat(groups) if self.affine else None
        bias = self.bias.repeat(groups) if self.affine else None
        # Per-group batch statistics come out of the same batch_norm call: with momentum 1 its running buffers
        # (one per group and channel) are set to them, the variance unbiased as torch's running variance is.
        group_mean = group_var = None
        if self.track_running_stats:
            group_mean = self.running_mean.new_zeros(groups * c)
            group_var = self.running_var.new_ones(groups * c)
        y = F.batch_norm(grouped, group_mean, group_var, weight, bias, True, 1.0, self.eps)
        if self.track_running_stats:
            with torch.no_grad():
                momentum = self.momentum if self.momentum is not None else 0.1
                self.running_mean.mul_(1 - momentum).add_(momentum * group_mean.view(groups, c).mean(0))
                self.running_var.mul_(1 - momentum).add_(momentum * group_var.view(groups, c).mean(0))
                self.num_batches_tracked.add_(1)
        return y.reshape(k, groups, c, *spatial).transpose(0, 1).reshape(x.shape)
