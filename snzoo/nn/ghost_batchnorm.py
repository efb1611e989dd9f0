"""BatchNorm2d with ghost batches: the BN baseline under the same device emulation as SN."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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
        if n % k:
            raise ValueError(f"batch of {n} samples does not split into ghost batches of {k}; "
                             "use a batch size that is a multiple of the ghost batch size")
        groups = n // k
        spatial = x.shape[2:]
        # Each group's channels become channels of their own, so one batch_norm call normalises every group.
        grouped = x.reshape(groups, k, c, *spatial).transpose(0, 1).reshape(k, groups * c, *spatial)
        weight = self.weight.repeat(groups) if self.affine else None
        bias = self.bias.repeat(groups) if self.affine else None
        y = F.batch_norm(grouped, None, None, weight, bias, True, 0.0, self.eps)
        if self.track_running_stats:
            with torch.no_grad():
                var, mean = torch.var_mean(grouped.float(), dim=[0, *range(2, grouped.dim())], correction=1)
                momentum = self.momentum if self.momentum is not None else 0.1
                self.running_mean.mul_(1 - momentum).add_(momentum * mean.view(groups, c).mean(0))
                self.running_var.mul_(1 - momentum).add_(momentum * var.view(groups, c).mean(0))
                self.num_batches_tracked.add_(1)
        return y.reshape(k, groups, c, *spatial).transpose(0, 1).reshape(x.shape)
