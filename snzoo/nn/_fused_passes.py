"""The full-size passes of `snzoo.nn.fused` on PyTorch ops: how x is viewed without a copy, per-(n, c) moments,
the backward's centred gradient sums and the per-(n, c) multiply-add (see `snzoo.nn.fused` for the formulas)."""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
from torch import Tensor


HALF = (torch.float16, torch.bfloat16)


# ------------------------------------------------------------------------------------------------- layout
class Layout:
    """How x is viewed as a 3-D tensor without copying: (N, C, L) reduced over dim 2, or (N, L, C) over dim 1."""

    __slots__ = ("c", "length", "n", "nlc", "red")

    def __init__(self, x: Tensor) -> None:
        self.n, self.c = x.shape[0], x.shape[1]
        self.length = math.prod(x.shape[2:])
        # channels_last (or any layout with the channels innermost): compute on the (N, L, C) view.
        self.nlc = x.dim() >= 3 and not x.is_contiguous() and x.movedim(1, -1).is_contiguous()
        self.red = 1 if self.nlc else 2

    def view3(self, t: Tensor) -> Tensor:
        """t (shaped like x) viewed as (N, C, L) or (N, L, C); copies only when t has another layout."""
        if self.nlc:
            return t.movedim(1, -1).reshape(self.n, self.length, self.c)
        return t.reshape(self.n, self.c, self.length)

    def empty_like(self, x: Tensor, dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
        """A new tensor shaped like x in this layout, and its 3-D view."""
        fmt = torch.preserve_format if self.nlc else torch.contiguous_format
        full = torch.empty_like(x, dtype=dtype, memory_format=fmt)
        return full, self.view3(full)

    def unview3(self, t3: Tensor, x: Tensor) -> Tensor:
        """Inverse of view3: a 3-D result back to x's shape (x's layout)."""
        if self.nlc:
            return t3.reshape((self.n,) + tuple(x.shape[2:]) + (self.c,)).movedim(-1, 1)
        return t3.reshape(x.shape)

    def stat(self, t: Tensor) -> Tensor:
        """An (N, C) tensor shaped to broadcast against the 3-D view."""
        return t.reshape(self.n, 1, self.c) if self.nlc else t.reshape(self.n, self.c, 1)

    def unstat(self, t: Tensor) -> Tensor:
        return t.reshape(self.n, self.c)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation / compute dtype of the full-size passes: float32 for half inputs."""
    return torch.float32 if dtype in HALF else dtype


def stat_dtype(x: Tensor) -> torch.dtype:
    """dtype of the tiny (N, C) statistics: float64 where the device has it."""
    return torch.float32 if x.device.type == "mps" else torch.float64


@functools.lru_cache(maxsize=32)
def identity_bn_stats(size: int, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Mean 0, variance 1 and an empty tensor for BatchNorm's inference kernel used as a plain multiply-add."""
    with torch.inference_mode(False):  # ordinary tensors even when first built under inference_mode
        return torch.zeros(size, dtype=dtype), torch.ones(size, dtype=dtype), torch.empty(0, dtype=dtype)


def moments(t: Tensor, lay: Layout, sd: torch.dtype, fast_kernels: bool) -> tuple[Tensor, Tensor]:
    """Per-(n, c) mean and sum of squared deviations of the 3-D view t, as (N, C) tensors in the stats dtype.

    (N, C, L): sum and sum of squares (two vectorised reads, no temporary); the sum of squared deviations is
    s2 - s1^2 / L, accurate when the mean is not large against the spread (the callers check, or pass a
    centred t). (N, L, C) in CPU eager mode: BatchNorm's channels-last statistics kernel on each sample
    (mean, then squared deviations; one call per sample); otherwise sum and a product temporary.
    """
    length, red = lay.length, lay.red
    if lay.nlc and fast_kernels:
        means, variances = [], []
        for i in range(lay.n):  # sample i as a (1, C, L, 1) channels_last tensor: no copy
            mean_i, var_i = torch.batch_norm_update_stats(t[i].t().unsqueeze(0).unsqueeze(-1), None, None, 0.0)
            means.append(mean_i)
            variances.append(var_i)
        mean = torch.stack(means).to(sd)
        return mean, torch.stack(variances).to(sd) * length
    s1 = lay.unstat(t.sum(red, keepdim=True)).to(sd)
    if red == t.dim() - 1:
        s2 = torch.linalg.vector_norm(t, 2, dim=red, keepdim=True).square_()
    else:
        s2 = (t * t).sum(red, keepdim=True)
    mean = s1 / length
    return mean, lay.unstat(s2).to(sd).addcmul_(s1, mean, value=-1)


def centred_grad_sums(g: Tensor, v: Tensor, centre: Tensor, lay: Layout, sd: torch.dtype, fast_kernels: bool,
                       buf: Tensor) -> tuple[Tensor, Tensor]:
    """Per-(n, c) sum_L g and sum_L g * (v - centre), as (N, C) tensors in the stats dtype.

    In CPU eager mode BatchNorm's backward kernel computes both in one read of g and v, without a temporary
    (its grad_bias and grad_weight with mean = centre, invstd = 1). Otherwise buf (full-size) holds the product.
    """
    if fast_kernels:
        # the kernel reads grad and input in the input's memory format: both must be dense in the 3-D layout
        g, v = g.contiguous(), v.contiguous()
        if not lay.nlc:
            nc, length = lay.n * lay.c, lay.length
            _, dot, s1 = torch.ops.aten.native_batch_norm_backward(
                g.view(1, nc, length), v.view(1, nc, length), None, None, None, centre.reshape(nc),
                identity_bn_stats(nc, v.dtype)[1], True, 0.0, [False, True, True],
            )
        else:  # one call per sample, each a (1, C, L, 1) channels_last tensor
            ones = identity_bn_stats(lay.c, v.dtype)[1]
            sums = [
                torch.ops.aten.native_batch_norm_backward(
                    g[i].t()[None, :, :, None], v[i].t()[None, :, :, None], None, None, None, centre[i].reshape(-1),
                    ones, True, 0.0, [False, True, True],
                )
                for i in range(lay.n)
            ]
            dot, s1 = torch.stack([t[1] for t in sums]), torch.stack([t[2] for t in sums])
        return lay.unstat(s1).to(sd), lay.unstat(dot).to(sd)
    s1 = g.sum(lay.red, keepdim=True)
    torch.sub(v, centre, out=buf)
    buf.mul_(g)
    return lay.unstat(s1).to(sd), lay.unstat(buf.sum(lay.red, keepdim=True)).to(sd)


def affine(base: Tensor, scale: Tensor, shift: Tensor, out: Optional[Tensor], fast_kernels: bool) -> Tensor:
    """base * scale + shift with per-(n, c) scale and shift (stat-shaped), into out when given.

    On the (N, C, L) layout both scale and shift broadcast along the innermost dim, which TensorIterator's
    addcmul does not vectorise; in CPU eager mode BatchNorm's inference kernel does the same multiply-add
    vectorised (base viewed as (1, N*C, L), mean 0, variance 1, eps 0, weight = scale, bias = shift).
    """
    if out is None:
        return torch.addcmul(shift, base, scale)
    if fast_kernels and base.dim() == 3 and shift.shape[-1] == 1 and base.is_contiguous() and out.is_contiguous():
        n, c, length = base.shape
        zeros, ones, nothing = identity_bn_stats(n * c, base.dtype)
        torch.ops.aten.native_batch_norm.out(
            base.view(1, n * c, length), scale.reshape(n * c), shift.reshape(n * c), zeros, ones, False, 0.0, 0.0,
            out=out.view(1, n * c, length), save_mean=nothing, save_invstd=nothing,
        )
        return out
    return torch.addcmul(shift, base, scale, out=out)


# Largest mean_in^2 / (var_in + eps) for which the plain sums are accurate enough: their relative error on the
# variance is about eps_dtype * (that ratio) * a small factor, i.e. <= ~1e-5 (float32) / ~1e-11 (float64).
CONDITION_LIMIT = {torch.float32: 64.0, torch.float64: 1e4}


def well_conditioned(mean: Tensor, var_in: Tensor, eps: float, dtype: torch.dtype) -> bool:
    """True unless some (n, c) has mean^2 > limit * (var + eps), where the plain sums lose too much."""
    # mean^2 > limit * (var + eps)  <=>  var - mean^2 / limit < -eps: one operation and one reduction
    return not float(torch.addcmul(var_in, mean, mean, value=-1.0 / CONDITION_LIMIT[dtype]).min()) < -eps


def instance_moments(v: Tensor, lay: Layout, sd, eps: float, allow_fast: bool, out: Optional[Tensor]):
    """Per-(n, c) mean and unbiased variance (N, C) in the stats dtype, from the 3-D view v (compute dtype).

    Returns (mean_in, var_in, shift, d): shift is None when the plain moments of v were accurate enough (then d
    is None too); otherwise shift (stat-shaped, v's dtype) is the rounded mean and d = v - shift (written into
    out when given), whose moments give the statistics (the shifted two-pass variance, free of cancellation).
    """
    length = lay.length
    if length == 1:  # a single value: mean = x, variance defined as 0 (the original gives 0/0)
        shift = v.detach()
        d = torch.sub(v, shift, out=out) if out is not None else v - shift
        mean_in = lay.unstat(v).to(sd)
        return mean_in, torch.zeros_like(mean_in), shift, d
    mean, css = moments(v, lay, sd, allow_fast)
    if allow_fast:
        var_in = css / (length - 1)
        if well_conditioned(mean, var_in, eps, v.dtype):
            return mean, var_in, None, None
    shift = lay.stat(mean.detach().to(v.dtype))  # y does not depend on the shift: no gradient through it
    d = torch.sub(v, shift, out=out) if out is not None else v - shift
    mean_d, css_d = moments(d, lay, sd, allow_fast)
    return lay.unstat(shift).to(sd) + mean_d, css_d / (length - 1), shift, d
