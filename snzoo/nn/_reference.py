"""The reference formulas of switchable normalisation, written as the equations read (see `snzoo.nn.functional`
for the statistics they define). `snzoo.nn.fused` computes the same values the fast way."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from snzoo.nn._checks import ghost_group_size, resolve_process_group

TERMS_SN = ("in", "ln", "bn")
TERMS_SN_NO_BN = ("in", "ln")
TERMS_SN1D = ("ln", "bn")


def instance_stats(x3: Tensor) -> tuple[Tensor, Tensor]:
    """Per-(sample, channel) mean and unbiased variance of x viewed as (N, C, L); shapes (N, C, 1).

    With L == 1 the variance is defined as 0 instead of the original's NaN.
    """
    if x3.shape[2] == 1:
        return x3, torch.zeros_like(x3)
    var, mean = torch.var_mean(x3, dim=2, keepdim=True, correction=1)
    return mean, var


def layer_stats(mean_in: Tensor, second_moment_in: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample statistics over channels, shapes (N, 1, 1), from the IN mean and E[x^2] (var_in + mean_in^2)."""
    mean_ln = mean_in.mean(1, keepdim=True)
    var_ln = second_moment_in.mean(1, keepdim=True) - mean_ln.pow(2)
    return mean_ln, var_ln


def batch_stats(
    mean_in: Tensor,
    second_moment_in: Tensor,
    ghost_batch_size: Optional[int] = None,
    process_group: Optional[object] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-channel statistics over samples.

    Returns (mean_bn, var_bn) shaped to broadcast against (N, C, 1) in the normalisation, and
    (mean_update, var_update) of shape (G, C, 1), the statistics of each of the G ghost batches (G = 1
    without ghost batches), for `update_running_stats`.

    - ghost_batch_size=k: statistics over each group of k consecutive samples, as k samples on each of N/k
      devices with unsynchronised statistics; the running update is the mean over groups, i.e. what the
      per-device running buffers average to.
    - process_group: statistics over the samples of every rank (mean and E[x^2] all-reduced, gradients too).
    """
    if process_group is not None:
        return _synchronised_batch_stats(mean_in, second_moment_in, process_group)
    n, c = mean_in.shape[0], mean_in.shape[1]
    if ghost_group_size(n, ghost_batch_size) == n:
        mean_bn = mean_in.mean(0, keepdim=True)
        var_bn = second_moment_in.mean(0, keepdim=True) - mean_bn.pow(2)
        return mean_bn, var_bn, mean_bn, var_bn
    groups = n // ghost_batch_size
    mean_g = mean_in.reshape(groups, ghost_batch_size, c, 1).mean(1)
    var_g = second_moment_in.reshape(groups, ghost_batch_size, c, 1).mean(1) - mean_g.pow(2)
    per_sample_mean = mean_g.repeat_interleave(ghost_batch_size, dim=0)
    per_sample_var = var_g.repeat_interleave(ghost_batch_size, dim=0)
    return per_sample_mean, per_sample_var, mean_g, var_g


def _synchronised_batch_stats(mean_in: Tensor, second_moment_in: Tensor, process_group: object):
    from torch.distributed.nn.functional import all_reduce  # differentiable: its backward all-reduces too

    n, c = mean_in.shape[0], mean_in.shape[1]
    count = mean_in.new_full((1,), float(n))
    packed = torch.cat([mean_in.sum(0).reshape(c), second_moment_in.sum(0).reshape(c), count])
    group = resolve_process_group(process_group)
    total = all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    mean_bn = (total[:c] / total[-1]).reshape(1, c, 1)
    var_bn = (total[c : 2 * c] / total[-1]).reshape(1, c, 1) - mean_bn.pow(2)
    return mean_bn, var_bn, mean_bn, var_bn


@torch.no_grad()
def update_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    mean_bn: Tensor,
    var_bn: Tensor,
    momentum: float,
    using_moving_average: bool,
) -> None:
    """Moving average (momentum weighs the OLD value) or, in batch-average mode, accumulate mean and E[x^2].

    mean_bn / var_bn hold one row (dim 0) per ghost batch; the buffers get the mean over rows of the update
    each row would give its own buffers (in batch-average mode mean(mean_g^2 + var_g), not mean(mean_g)^2 + ...).
    """
    mean_bn = mean_bn.detach().to(running_mean.dtype)
    var_bn = var_bn.detach().to(running_var.dtype)
    if using_moving_average:
        running_mean.mul_(momentum).add_((1 - momentum) * mean_bn.mean(0, keepdim=True))
        running_var.mul_(momentum).add_((1 - momentum) * var_bn.mean(0, keepdim=True))
    else:
        running_mean.add_(mean_bn.mean(0, keepdim=True))
        running_var.add_((mean_bn.pow(2) + var_bn).mean(0, keepdim=True))


def switch_norm_reference(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    mean_probs: Tensor,
    var_probs: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    *,
    terms: Sequence[str],
    training: bool,
    momentum: float,
    eps: float,
    using_moving_average: bool = True,
    ghost_batch_size: Optional[int] = None,
    process_group: Optional[object] = None,
) -> Tensor:
    """Switchable normalisation of x (N, C, *spatial), written straightforwardly (the reference implementation).

    mean_probs / var_probs are the importance weights after softmax (or sparsestmax), ordered as `terms`,
    a subset of ("in", "ln", "bn"). In training the BN term uses batch statistics and updates the running
    buffers in place; in eval it uses the running buffers, while IN and LN stay per-sample.
    """
    n, c = x.shape[0], x.shape[1]
    # Half-precision inputs keep their statistics in float32, as the norm layers of AMP models do.
    x3 = x.reshape(n, c, -1)
    if x3.dtype in (torch.float16, torch.bfloat16):
        x3 = x3.float()
    mean_in, var_in = instance_stats(x3)
    second_moment_in = var_in + mean_in.pow(2)
    stats = {}
    if "in" in terms:
        stats["in"] = (mean_in, var_in)
    if "ln" in terms:
        stats["ln"] = layer_stats(mean_in, second_moment_in)
    if "bn" in terms:
        if training:
            mean_bn, var_bn, mean_update, var_update = batch_stats(
                mean_in, second_moment_in, ghost_batch_size, process_group
            )
            update_running_stats(running_mean, running_var, mean_update, var_update, momentum, using_moving_average)
            stats["bn"] = (mean_bn, var_bn)
        else:
            stats["bn"] = (running_mean, running_var)
    mean = sum(mean_probs[i] * stats[t][0] for i, t in enumerate(terms))
    var = sum(var_probs[i] * stats[t][1] for i, t in enumerate(terms))
    y = (x3 - mean) / (var + eps).sqrt()
    y = y * weight.reshape(1, c, 1) + bias.reshape(1, c, 1)
    return y.to(x.dtype).reshape(x.shape)


def switch_norm_flat(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    mean_probs: Tensor,
    var_probs: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    *,
    training: bool,
    momentum: float,
    eps: float,
    using_moving_average: bool = True,
    ghost_batch_size: Optional[int] = None,
) -> Tensor:
    """SwitchNorm1d on (N, C) input: LN = mean and unbiased variance over C, BN = the same over N."""
    n, c = x.shape
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    var_ln, mean_ln = torch.var_mean(xf, dim=1, keepdim=True, correction=1 if c > 1 else 0)
    if training:
        k = ghost_group_size(n, ghost_batch_size)
        groups = xf.reshape(n // k, k, c)
        var_g, mean_g = torch.var_mean(groups, dim=1, keepdim=True, correction=1 if k > 1 else 0)
        update_running_stats(
            running_mean, running_var, mean_g.reshape(n // k, c), var_g.reshape(n // k, c), momentum, using_moving_average
        )
        mean_bn = mean_g.expand(n // k, k, c).reshape(n, c)
        var_bn = var_g.expand(n // k, k, c).reshape(n, c)
    else:
        mean_bn, var_bn = running_mean, running_var
    mean = mean_probs[0] * mean_ln + mean_probs[1] * mean_bn
    var = var_probs[0] * var_ln + var_probs[1] * var_bn
    y = (xf - mean) / (var + eps).sqrt() * weight + bias
    return y.to(x.dtype)
