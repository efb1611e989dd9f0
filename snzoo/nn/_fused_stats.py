"""The (N, C)-sized statistics of `snzoo.nn.fused`: ghost-batch groups, the mixing of the IN, LN and BN terms,
synchronised BN statistics over a process group and the means over ranks of the backward."""

from __future__ import annotations


import torch
import torch.distributed as dist
from torch import Tensor


# --------------------------------------------------------------------------------------- tiny statistics
def mixed_stats(mean_in: Tensor, var_in: Tensor, pm: Tensor, pv: Tensor, terms, training, k, rm, rv, pg=None):
    """Mixed mean and variance (N, C) from the IN statistics, plus what backward and the running update need.

    Returns (mu, sigma2, means, variances, group): means / variances list the statistics of the K terms in their
    own broadcastable shapes ((N, C) for IN and training BN, (N, 1) for LN, (1, C) for eval BN), so that no
    (K, N, C) tensor is built unless the backward needs it; group = the BN statistics (G, C) of each (ghost)
    batch in training with a BN term, else None. With a process group pg the BN statistics are those of the
    samples of every rank (then G = 1).
    """
    n, c = mean_in.shape
    means, variances = [], []
    group = None
    for t in terms:
        if t == "in":
            mean_t, var_t = mean_in, var_in
        elif t == "ln":
            mean_t, var_t = pooled(mean_in, var_in, 1)
        elif t == "bn" and training and pg is not None:
            mean_t, var_t = synchronised_bn_stats(mean_in, var_in, pg)
            group = (mean_t, var_t)
        elif t == "bn" and training:
            g = n // k
            mean_g, var_g = pooled(mean_in.reshape(g, k, c), var_in.reshape(g, k, c), 1)
            group = (mean_g.reshape(g, c), var_g.reshape(g, c))
            mean_t, var_t = mean_g.expand(g, k, c).reshape(n, c), var_g.expand(g, k, c).reshape(n, c)
        elif t == "bn":
            mean_t, var_t = rm.reshape(1, c).to(mean_in.dtype), rv.reshape(1, c).to(mean_in.dtype)
        else:
            raise ValueError(f"unknown switchable-normalisation term {t!r}")
        means.append(mean_t)
        variances.append(var_t)
    return mix(pm, means, mean_in), mix(pv, variances, mean_in), means, variances, group


def pooled(mean: Tensor, var: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Mean and variance of the groups whose per-group statistics are pooled along dim (kept), in the
    cancellation-free form mean(var) + mean((mean - pooled mean)^2)."""
    pooled = mean.mean(dim, keepdim=True)
    return pooled, var.mean(dim, keepdim=True) + (mean - pooled).square().mean(dim, keepdim=True)


def synchronised_bn_stats(mean_in: Tensor, var_in: Tensor, pg) -> tuple[Tensor, Tensor]:
    """Per-channel mean and variance (1, C) over the samples of every rank of process group pg.

    Each rank contributes its count, mean and sum of squared deviations; one all_gather, then Chan's parallel
    combination, so that nothing cancels (the same values as E[x^2] - mean^2, without its rounding).
    """
    n, c = mean_in.shape
    local_mean = mean_in.mean(0)
    local_m2 = (var_in + (mean_in - local_mean).square()).sum(0)
    packed = torch.cat([mean_in.new_full((1,), float(n)), local_mean, local_m2])
    gathered = [torch.empty_like(packed) for _ in range(dist.get_world_size(pg))]
    dist.all_gather(gathered, packed, group=pg)
    table = torch.stack(gathered)
    counts, means, m2 = table[:, :1], table[:, 1 : c + 1], table[:, c + 1 :]
    total = counts.sum()
    mean = (counts * means).sum(0) / total
    var = (m2 + counts * (means - mean).square()).sum(0) / total
    return mean.reshape(1, c), var.reshape(1, c)


def mix(probs: Tensor, stats: list, like: Tensor) -> Tensor:
    """sum_k probs[k] * stats[k], broadcast to like's (N, C) shape (one multiply-add per term)."""
    weights = probs.unbind(0)
    mixed = torch.zeros_like(like)
    for p, stat in zip(weights, stats):
        mixed = torch.addcmul(mixed, stat, p)
    return mixed


def stacked(stats: list, n: int, c: int) -> Tensor:
    """The per-term statistics as one (K, N, C) tensor, for the backward."""
    return torch.stack([t.expand(n, c) for t in stats])


def all_ranks_mean(local_sums: Tensor, count: int, pg) -> Tensor:
    """Sums over the local samples (any shape), summed over every rank of pg and divided by the number of samples
    of all ranks: one all_reduce."""
    packed = torch.cat([local_sums.reshape(-1), local_sums.new_full((1,), float(count))])
    dist.all_reduce(packed, group=pg)
    return (packed[:-1] / packed[-1]).reshape(local_sums.shape)
