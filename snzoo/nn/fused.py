"""The fast path of switchable normalisation: few full-size passes, an analytic backward, BatchNorm-like memory.

The statistics are those of `snzoo.nn.functional` (unbiased IN variance; LN and BN variances built from it as
E[var_in + mean_in^2] - mean^2; L == 1 -> IN variance 0; ghost batches; BN statistics synchronised over a
process group (one all_gather of per-rank count, mean and squared deviations, combined without cancellation);
running-buffer updates through `functional.update_running_stats`); only the way they are computed differs.
x is viewed as (N, C, L), or as (N, L, C) without a copy when the channels are innermost (channels_last).

Forward
-------
1. Per-(n, c) moments of x: sum and sum of squares (two vectorised reads, no temporary) on (N, C, L); on
   (N, L, C) BatchNorm's channels-last statistics kernel, one call per sample. torch.var_mean would be
   accurate too, but its Welford kernel is ~50x slower than a sum on CPU.
2. Conditioning check on the (N, C) result: a sum of squares cancels when the mean is large against the spread
   (relative error ~ eps_dtype * mean^2 / var). If any (n, c) has mean^2 > limit * (var + eps) (limit 64 in
   float32, i.e. |mean| > 8 std), the statistics are recomputed from d = x - m, m the rounded mean (d is exact
   for such inputs, and written into the output buffer): the shifted two-pass variance, accurate for, e.g.,
   mean 1e4 with std 1e-2. The check needs the host to read one boolean, so it runs only in CPU eager mode; on
   other devices, under torch.compile and while exporting, the shifted form is always used (no sync, no
   data-dependent graph).
3. Everything derived from the IN statistics lives on tiny (N, C) tensors, in float64 (float32 on MPS), with
   the LN and BN variances in the cancellation-free form mean(var_in) + mean((mean_in - mean)^2), which equals
   the definition exactly.
4. ONE per-(n, c) affine map: y = x * scale + shift (or d * scale + shift'), scale = weight * rsqrt(var + eps),
   shift = bias - mean * scale. On (N, C, L) both operands broadcast along the innermost dim, which addcmul
   does not vectorise on CPU: BatchNorm's inference kernel does the same multiply-add vectorised.

Full-size passes (CPU, well-conditioned): 3 reads + 1 write and one allocation (the output); BatchNorm's
inference needs 1 read + 1 write. The fallback adds 3 reads + 2 writes.

Backward
--------
Training with gradients goes through `_SwitchNormFunction`, which saves only x, the per-(n, c) shift (when
used) and (N, C)-sized statistics. With y = (x - mu) * a + b (a = weight * r, r = (sigma2 + eps)^-1/2,
mu = sum_k pm_k mean_k, sigma2 = sum_k pv_k var_k) and g = dL/dy:

- per (n, c): S1 = sum_L g and T = sum_L g * (x - mu) = sum_L g * (x - m) - (mu - m) * S1, m the rounded IN
  mean (the shift, after the fallback), so that nothing cancels;
- dbias = sum_N S1, dweight = sum_N r * T, dmu = -a * S1, dsigma2 = -weight * T * r^3 / 2;
- dpm_k = sum_NC dmu * mean_k, dpv_k = sum_NC dsigma2 * var_k (autograd takes them on through softmax or
  sparsestmax to the raw importance weights);
- back to the IN statistics through the mixing (G: the samples of the batch or ghost batch, or of every rank
  with synchronised statistics, where the mean over G is one all_reduce; in eval the BN term is the running
  buffers, constants):
  dmean_in = pm_in dmu + mean_C(pm_ln dmu) + mean_G(pm_bn dmu)
             + 2 (mean_in - mean_ln) mean_C(pv_ln dsigma2) + 2 (mean_in - mean_bn) mean_G(pv_bn dsigma2),
  dvar_in = pv_in dsigma2 + mean_C(pv_ln dsigma2) + mean_G(pv_bn dsigma2);
- dx = g * a + dmean_in / L + dvar_in * 2 (x - mean_in) / (L - 1) = g * a + x * B + C per (n, c), with
  B = 2 dvar_in / (L - 1) (0 when L == 1) and C = dmean_in / L - B * mean_in (after the fallback the same with
  x - shift for x and mean_in - shift for mean_in).

Full-size passes (CPU): S1 and sum_L g * (x - m) in one read of g and x by BatchNorm's backward kernel (its
grad_bias and grad_weight with mean m and invstd 1; no temporary); x * B + C into the gradient buffer
(1 read, 1 write, BatchNorm's inference kernel); + g * a (2 reads, 1 write): 5 reads + 2 writes and one
allocation. Elsewhere the product g * (x - m) is formed in the gradient buffer first (3 more passes).

snzoo's compiled CPU kernel (`snzoo.nn.cpu_kernels`), where it is built, takes the full-size passes of both
directions in CPU eager mode for any input it `fits` (contiguous or channels-innermost, float32 / float64 / bfloat16
/ float16 read and written as they are, float32 accumulation): the statistics in one read from memory (parts of
the row centred on their own mean and combined exactly, so no conditioning check and no host sync), the output
in one more; in the backward S1 and sum_L g * (x - m) in one read of g and x, and dx in one pass. The (N, C)
algebra is the same as below.

Without gradients (eval, torch.no_grad / inference_mode, statistics passes) the same forward runs as plain torch
ops (no autograd.Function). In eval on CPU, contiguous float32 / float64 input takes `_eval_forward_cpu`: snzoo's
compiled kernel (`snzoo.nn.cpu_kernels`: statistics in one read of each row, the output in a second, one call per
layer), or where it is not built, the same passes as torch ops with about a third of the small (N, C) operations
(statistics in the input's dtype, probabilities as Python floats, no per-term stacks), which at batch 8 are a
visible part of a ResNet-50's time. While tracing or exporting (torch.jit.trace, torch.onnx.export, torch.export)
it runs out of place with addcmul, so the exported graph is the fused formula: per-(n, c) scale and shift, one
multiply-add.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from snzoo.nn import cpu_kernels

_HALF = (torch.float16, torch.bfloat16)


# ------------------------------------------------------------------------------------------------- layout
class _Layout:
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


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation / compute dtype of the full-size passes: float32 for half inputs."""
    return torch.float32 if dtype in _HALF else dtype


def _stat_dtype(x: Tensor) -> torch.dtype:
    """dtype of the tiny (N, C) statistics: float64 where the device has it."""
    return torch.float32 if x.device.type == "mps" else torch.float64


@functools.lru_cache(maxsize=32)
def _identity_bn_stats(size: int, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Mean 0, variance 1 and an empty tensor for BatchNorm's inference kernel used as a plain multiply-add."""
    with torch.inference_mode(False):  # ordinary tensors even when first built under inference_mode
        return torch.zeros(size, dtype=dtype), torch.ones(size, dtype=dtype), torch.empty(0, dtype=dtype)


def _moments(t: Tensor, lay: _Layout, sd: torch.dtype, fast_kernels: bool) -> tuple[Tensor, Tensor]:
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


def _centred_grad_sums(g: Tensor, v: Tensor, centre: Tensor, lay: _Layout, sd: torch.dtype, fast_kernels: bool,
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
                _identity_bn_stats(nc, v.dtype)[1], True, 0.0, [False, True, True],
            )
        else:  # one call per sample, each a (1, C, L, 1) channels_last tensor
            ones = _identity_bn_stats(lay.c, v.dtype)[1]
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


def _affine(base: Tensor, scale: Tensor, shift: Tensor, out: Optional[Tensor], fast_kernels: bool) -> Tensor:
    """base * scale + shift with per-(n, c) scale and shift (stat-shaped), into out when given.

    On the (N, C, L) layout both scale and shift broadcast along the innermost dim, which TensorIterator's
    addcmul does not vectorise; in CPU eager mode BatchNorm's inference kernel does the same multiply-add
    vectorised (base viewed as (1, N*C, L), mean 0, variance 1, eps 0, weight = scale, bias = shift).
    """
    if out is None:
        return torch.addcmul(shift, base, scale)
    if fast_kernels and base.dim() == 3 and shift.shape[-1] == 1 and base.is_contiguous() and out.is_contiguous():
        n, c, length = base.shape
        zeros, ones, nothing = _identity_bn_stats(n * c, base.dtype)
        torch.ops.aten.native_batch_norm.out(
            base.view(1, n * c, length), scale.reshape(n * c), shift.reshape(n * c), zeros, ones, False, 0.0, 0.0,
            out=out.view(1, n * c, length), save_mean=nothing, save_invstd=nothing,
        )
        return out
    return torch.addcmul(shift, base, scale, out=out)


# --------------------------------------------------------------------------------------- tiny statistics
def _group_size(n: int, ghost_batch_size: Optional[int]) -> int:
    if ghost_batch_size is None or ghost_batch_size >= n:
        return n
    if n % ghost_batch_size:
        raise ValueError(
            f"batch of {n} samples does not split into ghost batches of {ghost_batch_size}; "
            "use a batch size that is a multiple of the ghost batch size (e.g. drop_last=True in the DataLoader)"
        )
    return ghost_batch_size


def _mixed_stats(mean_in: Tensor, var_in: Tensor, pm: Tensor, pv: Tensor, terms, training, k, rm, rv, pg=None):
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
            mean_t, var_t = _pooled(mean_in, var_in, 1)
        elif t == "bn" and training and pg is not None:
            mean_t, var_t = _synchronised_bn_stats(mean_in, var_in, pg)
            group = (mean_t, var_t)
        elif t == "bn" and training:
            g = n // k
            mean_g, var_g = _pooled(mean_in.reshape(g, k, c), var_in.reshape(g, k, c), 1)
            group = (mean_g.reshape(g, c), var_g.reshape(g, c))
            mean_t, var_t = mean_g.expand(g, k, c).reshape(n, c), var_g.expand(g, k, c).reshape(n, c)
        elif t == "bn":
            mean_t, var_t = rm.reshape(1, c).to(mean_in.dtype), rv.reshape(1, c).to(mean_in.dtype)
        else:
            raise ValueError(f"unknown switchable-normalisation term {t!r}")
        means.append(mean_t)
        variances.append(var_t)
    return _mix(pm, means, mean_in), _mix(pv, variances, mean_in), means, variances, group


def _pooled(mean: Tensor, var: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Mean and variance of the groups whose per-group statistics are pooled along dim (kept), in the
    cancellation-free form mean(var) + mean((mean - pooled mean)^2)."""
    pooled = mean.mean(dim, keepdim=True)
    return pooled, var.mean(dim, keepdim=True) + (mean - pooled).square().mean(dim, keepdim=True)


def _synchronised_bn_stats(mean_in: Tensor, var_in: Tensor, pg) -> tuple[Tensor, Tensor]:
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


def _mix(probs: Tensor, stats: list, like: Tensor) -> Tensor:
    """sum_k probs[k] * stats[k], broadcast to like's (N, C) shape (one multiply-add per term)."""
    weights = probs.unbind(0)
    mixed = torch.zeros_like(like)
    for p, stat in zip(weights, stats):
        mixed = torch.addcmul(mixed, stat, p)
    return mixed


def _stacked(stats: list, n: int, c: int) -> Tensor:
    """The per-term statistics as one (K, N, C) tensor, for the backward."""
    return torch.stack([t.expand(n, c) for t in stats])


# Largest mean_in^2 / (var_in + eps) for which the plain sums are accurate enough: their relative error on the
# variance is about eps_dtype * (that ratio) * a small factor, i.e. <= ~1e-5 (float32) / ~1e-11 (float64).
_CONDITION_LIMIT = {torch.float32: 64.0, torch.float64: 1e4}


def _well_conditioned(mean: Tensor, var_in: Tensor, eps: float, dtype: torch.dtype) -> bool:
    """True unless some (n, c) has mean^2 > limit * (var + eps), where the plain sums lose too much."""
    # mean^2 > limit * (var + eps)  <=>  var - mean^2 / limit < -eps: one operation and one reduction
    return not float(torch.addcmul(var_in, mean, mean, value=-1.0 / _CONDITION_LIMIT[dtype]).min()) < -eps


def _fast_allowed(x: Tensor) -> bool:
    """Plain moments with a host-side conditioning check, and BatchNorm's CPU kernels: CPU eager mode only."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64, *_HALF) or _exporting():
        return False
    return not torch.compiler.is_compiling()


def _instance_moments(v: Tensor, lay: _Layout, sd, eps: float, allow_fast: bool, out: Optional[Tensor]):
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
    mean, css = _moments(v, lay, sd, allow_fast)
    if allow_fast:
        var_in = css / (length - 1)
        if _well_conditioned(mean, var_in, eps, v.dtype):
            return mean, var_in, None, None
    shift = lay.stat(mean.detach().to(v.dtype))  # y does not depend on the shift: no gradient through it
    d = torch.sub(v, shift, out=out) if out is not None else v - shift
    mean_d, css_d = _moments(d, lay, sd, allow_fast)
    return lay.unstat(shift).to(sd) + mean_d, css_d / (length - 1), shift, d


def _core_forward(x, weight, bias, mean_probs, var_probs, rm, rv, terms, training, eps, k, inplace, allow_fast,
                  pg=None):
    """The fused forward. Returns y, the per-group BN statistics (or None) and what the backward needs."""
    lay = _Layout(x)
    c = lay.c
    acc, sd = _acc_dtype(x.dtype), _stat_dtype(x)
    if allow_fast and cpu_kernels.fits(x) and cpu_kernels.active():
        return _kernel_forward(x, weight, bias, mean_probs, var_probs, rm, rv, terms, training, eps, k, pg, lay)
    v = lay.view3(x)
    if v.dtype != acc:
        v = v.to(acc)
    y = y3 = None
    if inplace:
        y, y3 = lay.empty_like(x, dtype=acc)
    mean_in, var_in, shift, d = _instance_moments(v, lay, sd, eps, allow_fast, y3)

    pm, pv = mean_probs.to(sd), var_probs.to(sd)
    mu, sigma2, means, variances, group = _mixed_stats(mean_in, var_in, pm, pv, terms, training, k, rm, rv, pg)
    r = torch.rsqrt(sigma2 + eps)
    w, b = weight.reshape(1, c).to(sd), bias.reshape(1, c).to(sd)
    a = w * r
    if shift is None:  # y = x * a + (b - mu * a)
        base, offset = v, mu
    else:  # y = (x - shift) * a + (b - (mu - shift) * a): no cancellation for large means
        base, offset = d, mu - lay.unstat(shift).to(sd)
    scale3, shift3 = lay.stat(a.to(acc)), lay.stat((b - offset * a).to(acc))
    if inplace:
        _affine(base, scale3, shift3, y3, allow_fast)
    else:
        y3 = _affine(base, scale3, shift3, None, False)
        y = lay.unview3(y3, x)
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    saved = (shift, mean_in, mu, r, a, means, variances, False)
    return y, group, saved


def _kernel_forward(x, weight, bias, mean_probs, var_probs, rm, rv, terms, training, eps, k, pg, lay):
    """`_core_forward` with its full-size passes in snzoo's CPU kernel: statistics in two reads of each row (centred
    on the rounded mean, so no conditioning check and no host sync), the output in one more; any layout the kernel
    `fits`, half-precision values read and written as they are."""
    c = lay.c
    mean_in, var_in, centre = cpu_kernels.moments(x)
    pm, pv = mean_probs.to(torch.float64), var_probs.to(torch.float64)
    mu, sigma2, means, variances, group = _mixed_stats(mean_in, var_in, pm, pv, terms, training, k, rm, rv, pg)
    r = torch.rsqrt(sigma2 + eps)
    a = weight.reshape(1, c).to(torch.float64) * r
    offset = mu - centre.to(torch.float64)
    shift = torch.addcmul(bias.reshape(1, c).to(torch.float64), offset, a, value=-1)
    y = cpu_kernels.apply_affine(x, centre, a.to(centre.dtype), shift.to(centre.dtype))
    return y, group, (lay.stat(centre), mean_in, mu, r, a, means, variances, True)


def _eval_forward_cpu(x, weight, bias, mean_probs, var_probs, rm, rv, terms, eps) -> Optional[Tensor]:
    """Eval forward without gradients for contiguous float32 / float64 CPU input: the compiled kernel when it is
    built, else torch ops with as few operations on the (N, C) statistics as possible (at batch 8 a torch call on
    such small tensors costs more than its arithmetic, and a ResNet-50 layer spends about as long on them as on its
    data).

    On torch ops the statistics stay in x's dtype: their inputs, the sums, carry that precision already, and the
    conditioning check bounds what the subtraction loses. Returns None when the check fails (the caller then takes
    the shifted path of `_core_forward`) or when x does not fit this path.
    """
    if cpu_kernels.fits(x) and cpu_kernels.active():
        return cpu_kernels.switch_norm_eval(x, weight, bias, mean_probs, var_probs, rm, rv, terms, eps)
    if x.dtype not in (torch.float32, torch.float64) or not x.is_contiguous() or x.dim() < 3:
        return None
    n, c = x.shape[0], x.shape[1]
    length = x.numel() // (n * c)
    if length < 2:
        return None
    lay = _Layout(x)
    v = lay.view3(x)
    mean, css = _moments(v, lay, x.dtype, True)
    var_in = css.mul_(1.0 / (length - 1))
    if not _well_conditioned(mean, var_in, eps, x.dtype):
        return None
    mu = sigma2 = None
    for t, pm, pv in zip(terms, mean_probs.tolist(), var_probs.tolist()):
        if t == "in":
            mean_t, var_t = mean, var_in
        elif t == "ln":
            mean_t, var_t = _pooled(mean, var_in, 1)
        else:  # "bn" in eval: the running buffers
            mean_t, var_t = rm.reshape(1, c), rv.reshape(1, c)
        if mu is None:
            mu, sigma2 = torch.mul(mean_t, pm).expand(n, c).clone(), torch.mul(var_t, pv).expand(n, c).clone()
        else:
            mu.add_(mean_t, alpha=pm)
            sigma2.add_(var_t, alpha=pv)
    scale = sigma2.add_(eps).rsqrt_().mul_(weight.reshape(1, c))
    shift = torch.addcmul(bias.reshape(1, c), mu, scale, value=-1)
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    _affine(v, scale.to(x.dtype).reshape(n, c, 1), shift.to(x.dtype).reshape(n, c, 1), y.view(n, c, length), True)
    return y


class _SwitchNormFunction(torch.autograd.Function):
    """Fused SN with an analytic backward; saves x, the per-(n, c) shift and (N, C) statistics."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean_probs, var_probs, rm, rv, terms, training, eps, k, allow_fast, pg):
        y, group, saved = _core_forward(
            x, weight, bias, mean_probs, var_probs, rm, rv, terms, training, eps, k, True, allow_fast, pg
        )
        shift, mean_in, mu, r, a, means, variances, kernel = saved
        n, c = mean_in.shape
        means, variances = _stacked(means, n, c), _stacked(variances, n, c)
        ctx.terms, ctx.training, ctx.k, ctx.pg = terms, training, k, pg
        ctx.shifted, ctx.fast_kernels, ctx.kernel = shift is not None, allow_fast, kernel
        if shift is None:
            shift = mean_in.new_zeros(())
        ctx.save_for_backward(x, weight, bias, mean_probs, var_probs, shift, mean_in, mu, r, a, means, variances)
        if group is None:
            mean_g = var_g = None
        else:
            mean_g, var_g = group
            ctx.mark_non_differentiable(mean_g, var_g)
        return y, mean_g, var_g

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y, _grad_mean_g=None, _grad_var_g=None):
        x, weight, bias, mean_probs, var_probs, shift, mean_in, mu, r, a, means, variances = ctx.saved_tensors
        terms, training, k = ctx.terms, ctx.training, ctx.k
        lay = _Layout(x)
        n, c, length, red = lay.n, lay.c, lay.length, lay.red
        acc, sd = _acc_dtype(x.dtype), mean_in.dtype
        # Full-size reductions S1 = sum_L g and sum_L g * (x - centre), centre = the rounded IN mean (the
        # shift, when the forward used one): centred, so nothing cancels.
        centre = shift if ctx.shifted else lay.stat(mean_in.to(acc))
        if ctx.kernel:
            if grad_y.stride() != x.stride() or grad_y.dtype != x.dtype:
                grad_y = torch.empty_like(x).copy_(grad_y)  # the kernel reads g in x's layout
            centre_k = lay.unstat(centre)
            s1g, sgc = cpu_kernels.grad_sums(grad_y, x, centre_k)
        else:
            v = lay.view3(x)
            g = lay.view3(grad_y)
            if v.dtype != acc:
                v, g = v.to(acc), g.to(acc)
            dx, buf = lay.empty_like(x, dtype=acc)
            s1g, sgc = _centred_grad_sums(g, v, centre, lay, sd, ctx.fast_kernels, buf)
        centre_nc = lay.unstat(centre).to(sd)
        offset = mu - centre_nc

        # (N, C) chain rule
        t_nc = sgc - offset * s1g  # sum_L g * (x - mu)
        d_mu = -a * s1g
        d_sigma2 = (-0.5 * weight.reshape(1, c).to(sd)) * t_nc * r.pow(3)
        grad_weight = (r * t_nc).sum(0) if ctx.needs_input_grad[1] else None
        grad_bias = s1g.sum(0) if ctx.needs_input_grad[2] else None
        grad_pm = (means * d_mu).sum((1, 2)) if ctx.needs_input_grad[3] else None
        grad_pv = (variances * d_sigma2).sum((1, 2)) if ctx.needs_input_grad[4] else None

        grad_x = None
        if ctx.needs_input_grad[0]:
            pm, pv = mean_probs.to(sd), var_probs.to(sd)
            d_mean_in = d_var_in = 0
            for i, t in enumerate(terms):
                gm, gv = pm[i] * d_mu, pv[i] * d_sigma2
                if t == "in":
                    d_mean_in = d_mean_in + gm
                    d_var_in = d_var_in + gv
                    continue
                if t == "ln":
                    gm, gv = gm.mean(1, keepdim=True), gv.mean(1, keepdim=True)
                elif t == "bn" and training and ctx.pg is not None:
                    # mean_bn and var_bn average over the samples of every rank: so do their gradients
                    gm, gv = _all_ranks_mean(torch.stack([gm.sum(0), gv.sum(0)]), n, ctx.pg).unbind(0)
                elif t == "bn" and training:
                    groups = n // k
                    gm, gv = (
                        grad.reshape(groups, k, c).mean(1, keepdim=True).expand(groups, k, c).reshape(n, c)
                        for grad in (gm, gv)
                    )
                else:  # eval "bn": the running buffers, constants
                    continue
                # a pooled term: mean = mean of mean_in, var = mean of var_in + (mean_in - mean)^2
                d_mean_in = d_mean_in + gm + 2 * (mean_in - means[i]) * gv
                d_var_in = d_var_in + gv
            d_mean_in = d_mean_in + torch.zeros_like(mean_in)  # terms without IN broadcast from (N, 1)
            # dx = g * a + dmean_in / L + dvar_in * 2 (x - mean_in) / (L - 1) = g * a + base * B + C
            if length > 1:
                coef_b = (2 / (length - 1)) * d_var_in + torch.zeros_like(mean_in)
            else:
                coef_b = torch.zeros_like(mean_in)
            if ctx.kernel:  # g * a + (x - centre) * B + dmean_in / L - B * (mean_in - centre)
                coef_c = d_mean_in / length - coef_b * (mean_in - centre_nc)
                grad_x = cpu_kernels.grad_input(grad_y, x, centre_k, a.to(acc), coef_b.to(acc), coef_c.to(acc))
                return _grads(grad_x, grad_weight, grad_bias, grad_pm, grad_pv, weight, bias, mean_probs, var_probs)
            b3, a3 = lay.stat(coef_b.to(acc)), lay.stat(a.to(acc))
            if ctx.shifted:  # (x - shift) * B + dmean_in / L - B * (mean_in - shift)
                c3 = lay.stat((d_mean_in / length - coef_b * (mean_in - centre_nc)).to(acc))
                torch.sub(v, shift, out=buf)
                _affine(buf, b3, c3, buf, ctx.fast_kernels)
            else:  # x * B + dmean_in / L - B * mean_in: well conditioned (checked in the forward)
                c3 = lay.stat((d_mean_in / length - coef_b * mean_in).to(acc))
                _affine(v, b3, c3, buf, ctx.fast_kernels)
            buf.addcmul_(g, a3)
            grad_x = dx if dx.dtype == x.dtype else dx.to(x.dtype)

        return _grads(grad_x, grad_weight, grad_bias, grad_pm, grad_pv, weight, bias, mean_probs, var_probs)


def _grads(grad_x, grad_weight, grad_bias, grad_pm, grad_pv, weight, bias, mean_probs, var_probs) -> tuple:
    """`_SwitchNormFunction.backward`'s result: the parameter gradients in their parameters' shapes and dtypes."""

    def _as(grad, like):
        return None if grad is None else grad.reshape(like.shape).to(like.dtype)

    return (
        grad_x,
        _as(grad_weight, weight),
        _as(grad_bias, bias),
        _as(grad_pm, mean_probs),
        _as(grad_pv, var_probs),
        None, None, None, None, None, None, None, None,
    )


def _all_ranks_mean(local_sums: Tensor, count: int, pg) -> Tensor:
    """Sums over the local samples (any shape), summed over every rank of pg and divided by the number of samples
    of all ranks: one all_reduce."""
    packed = torch.cat([local_sums.reshape(-1), local_sums.new_full((1,), float(count))])
    dist.all_reduce(packed, group=pg)
    return (packed[:-1] / packed[-1]).reshape(local_sums.shape)


def _process_group(process_group: Optional[object]):
    """The torch.distributed group to synchronise over (True: the default group), or None."""
    if process_group is None:
        return None
    return dist.group.WORLD if process_group is True else process_group


def _exporting() -> bool:
    """True while tracing or exporting: then the plain-op formulation runs instead of the autograd.Function."""
    if torch.jit.is_tracing():
        return True
    if torch.onnx.is_in_onnx_export():
        return True
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(is_exporting is not None and is_exporting())


def switch_norm_fused(
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
    """`functional.switch_norm` computed the fast way (same arguments, same results and buffer updates).

    With a process group the BN statistics are those of every rank's samples (one all_gather in the forward, one
    all_reduce in the backward; every rank needs a non-empty batch, as with DDP's drop_last). Inputs of fewer
    than 3 dimensions and empty inputs take the reference implementation.
    """
    from snzoo.nn import functional as F_sn

    if x.dim() < 3 or x.numel() == 0:
        return F_sn.switch_norm_reference(
            x, weight, bias, mean_probs, var_probs, running_mean, running_var, terms=terms, training=training,
            momentum=momentum, eps=eps, using_moving_average=using_moving_average,
            ghost_batch_size=ghost_batch_size, process_group=process_group,
        )
    terms = tuple(terms)
    use_bn = "bn" in terms
    pg = _process_group(process_group) if (training and use_bn) else None
    if pg is not None and ghost_batch_size is not None:
        raise ValueError("synchronised statistics and ghost batches exclude each other; set ghost_batch_size=None")
    k = _group_size(x.shape[0], ghost_batch_size) if (training and use_bn) else x.shape[0]
    rm = None if training or not use_bn else running_mean
    rv = None if training or not use_bn else running_var
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or bias.requires_grad or mean_probs.requires_grad
        or var_probs.requires_grad
    )
    allow_fast = _fast_allowed(x)
    exporting = _exporting()
    if needs_grad and not exporting:
        y, mean_g, var_g = _SwitchNormFunction.apply(
            x, weight, bias, mean_probs, var_probs, rm, rv, terms, training, eps, k, allow_fast, pg
        )
        group = None if mean_g is None else (mean_g, var_g)
    else:
        y = group = None
        if allow_fast and not training and not needs_grad:
            y = _eval_forward_cpu(x, weight, bias, mean_probs, var_probs, rm, rv, terms, eps)
        if y is None:
            y, group, _ = _core_forward(
                x, weight, bias, mean_probs, var_probs, rm, rv, terms, training, eps, k,
                not (needs_grad or exporting), allow_fast, pg,
            )
    if training and use_bn:
        mean_g, var_g = group
        F_sn.update_running_stats(
            running_mean, running_var, mean_g.unsqueeze(-1), var_g.unsqueeze(-1), momentum, using_moving_average
        )
    return y
