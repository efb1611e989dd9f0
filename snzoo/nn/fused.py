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

snzoo's compiled CPU kernel (`snzoo.nn.cpu_kernels`), where it is built, takes whole layers in CPU eager mode for any
input it `fits` (contiguous or channels-innermost, float32 / float64 / bfloat16 / float16 read and written as they
are, float32 accumulation): one operator call per layer and direction (`torch.ops.snzoo.switch_norm`, its autograd in
C++), which does the full-size passes (the statistics in one read from memory, parts of the row centred on their own
mean and combined exactly, so no conditioning check and no host sync; the output in one more; in the backward S1 and
sum_L g * (x - m) in one read of g and x, then dx in one pass) and all of the (N, C) algebra above, the running
update included, in float64. At batch 8 or on 28x28 maps the (N, C) work as torch calls costs more than the data.
With synchronised statistics the kernel's passes run with the (N, C) algebra here, in Python, because the all_gather
comes between the statistics and the output.

Without gradients (torch.no_grad / inference_mode, statistics passes) and elsewhere the same forward runs as plain
torch ops (no autograd.Function). While tracing or exporting (torch.jit.trace, torch.onnx.export, torch.export) it
runs out of place with addcmul, so the exported graph is the fused formula: per-(n, c) scale and shift, one
multiply-add.
"""


from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from snzoo.nn import _reference, _triton_kernels, cpu_kernels
from snzoo.nn._checks import check_sync_or_ghost, ghost_group_size, resolve_process_group
from snzoo.nn._fused_passes import HALF, Layout, acc_dtype, affine, centred_grad_sums, instance_moments, stat_dtype
from snzoo.nn._fused_stats import all_ranks_mean, mixed_stats, stacked


@dataclass(frozen=True)
class _Plan:
    """How one call normalises: the terms, the mode, the BN groups and where the statistics come from."""

    terms: tuple
    training: bool
    eps: float
    group: int  # samples of one BN statistics group (a ghost batch; N without)
    pg: object = None  # the process group of synchronised BN statistics, or None
    allow_fast: bool = False  # CPU eager: host-side checks and BatchNorm's CPU kernels may be used


def _fast_allowed(x: Tensor) -> bool:
    """Plain moments with a host-side conditioning check, and BatchNorm's CPU kernels: CPU eager mode only."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64, *HALF) or _exporting():
        return False
    return not torch.compiler.is_compiling()


def _pass_kernels(x: Tensor, allow_fast: bool):
    """The module whose compiled full-size passes take x (`cpu_kernels` or, opted in with SNZOO_TRITON=1, the Triton
    passes on CUDA), or None for PyTorch ops."""
    if allow_fast and cpu_kernels.fits(x) and cpu_kernels.active():
        return cpu_kernels
    if _triton_kernels.enabled() and _triton_kernels.fits(x) and not (_exporting() or torch.compiler.is_compiling()):
        return _triton_kernels
    return None


def _core_forward(x, weight, bias, mean_probs, var_probs, rm, rv, plan: _Plan, *, inplace: bool):
    """The fused forward. Returns y, the per-group BN statistics (or None) and what the backward needs."""
    lay = Layout(x)
    c = lay.c
    terms, training, eps, k, pg, allow_fast = plan.terms, plan.training, plan.eps, plan.group, plan.pg, plan.allow_fast
    acc, sd = acc_dtype(x.dtype), stat_dtype(x)
    kernels = _pass_kernels(x, allow_fast)
    if kernels is not None:
        return _kernel_forward(x, weight, bias, mean_probs, var_probs, rm, rv, plan, lay, kernels)
    v = lay.view3(x)
    if v.dtype != acc:
        v = v.to(acc)
    y = y3 = None
    if inplace:
        y, y3 = lay.empty_like(x, dtype=acc)
    mean_in, var_in, shift, d = instance_moments(v, lay, sd, eps, allow_fast, y3)

    pm, pv = mean_probs.to(sd), var_probs.to(sd)
    mu, sigma2, means, variances, group = mixed_stats(mean_in, var_in, pm, pv, terms, training, k, rm, rv, pg)
    r = torch.rsqrt(sigma2 + eps)
    w, b = weight.reshape(1, c).to(sd), bias.reshape(1, c).to(sd)
    a = w * r
    if shift is None:  # y = x * a + (b - mu * a)
        base, offset = v, mu
    else:  # y = (x - shift) * a + (b - (mu - shift) * a): no cancellation for large means
        base, offset = d, mu - lay.unstat(shift).to(sd)
    scale3, shift3 = lay.stat(a.to(acc)), lay.stat((b - offset * a).to(acc))
    if inplace:
        affine(base, scale3, shift3, y3, allow_fast)
    else:
        y3 = affine(base, scale3, shift3, None, False)
        y = lay.unview3(y3, x)
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    saved = (shift, mean_in, mu, r, a, means, variances, None)
    return y, group, saved


def _kernel_forward(x, weight, bias, mean_probs, var_probs, rm, rv, plan: _Plan, lay, kernels):
    """`_core_forward` with its full-size passes compiled (`kernels`: the CPU kernel where the (N, C) algebra must
    stay in Python, i.e. synchronised statistics, whose all_gather comes between the statistics and the output; or
    the Triton passes): statistics in one read from memory (centred, so no conditioning check and no host sync), the
    output in one more; any layout the passes `fit`, half-precision values read and written as they are."""
    c = lay.c
    mean_in, var_in, centre = kernels.moments(x)
    pm, pv = mean_probs.to(torch.float64), var_probs.to(torch.float64)
    mu, sigma2, means, variances, group = mixed_stats(
        mean_in, var_in, pm, pv, plan.terms, plan.training, plan.group, rm, rv, plan.pg
    )
    r = torch.rsqrt(sigma2 + plan.eps)
    a = weight.reshape(1, c).to(torch.float64) * r
    offset = mu - centre.to(torch.float64)
    shift = torch.addcmul(bias.reshape(1, c).to(torch.float64), offset, a, value=-1)
    y = kernels.apply_affine(x, centre, a.to(centre.dtype), shift.to(centre.dtype))
    return y, group, (lay.stat(centre), mean_in, mu, r, a, means, variances, kernels)


class _SwitchNormFunction(torch.autograd.Function):
    """Fused SN with an analytic backward; saves x, the per-(n, c) shift and (N, C) statistics."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean_probs, var_probs, rm, rv, plan: _Plan):
        y, group, saved = _core_forward(x, weight, bias, mean_probs, var_probs, rm, rv, plan, inplace=True)
        shift, mean_in, mu, r, a, means, variances, kernel = saved
        n, c = mean_in.shape
        means, variances = stacked(means, n, c), stacked(variances, n, c)
        ctx.terms, ctx.training, ctx.k, ctx.pg = plan.terms, plan.training, plan.group, plan.pg
        ctx.shifted, ctx.fast_kernels, ctx.kernels = shift is not None, plan.allow_fast, kernel
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
        lay = Layout(x)
        n, c, length, red = lay.n, lay.c, lay.length, lay.red
        acc, sd = acc_dtype(x.dtype), mean_in.dtype
        # Full-size reductions S1 = sum_L g and sum_L g * (x - centre), centre = the rounded IN mean (the
        # shift, when the forward used one): centred, so nothing cancels.
        centre = shift if ctx.shifted else lay.stat(mean_in.to(acc))
        if ctx.kernels:
            if grad_y.stride() != x.stride() or grad_y.dtype != x.dtype:
                grad_y = torch.empty_like(x).copy_(grad_y)  # the kernel reads g in x's layout
            centre_k = lay.unstat(centre)
            s1g, sgc = ctx.kernels.grad_sums(grad_y, x, centre_k)
        else:
            v = lay.view3(x)
            g = lay.view3(grad_y)
            if v.dtype != acc:
                v, g = v.to(acc), g.to(acc)
            dx, buf = lay.empty_like(x, dtype=acc)
            s1g, sgc = centred_grad_sums(g, v, centre, lay, sd, ctx.fast_kernels, buf)
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
                    gm, gv = all_ranks_mean(torch.stack([gm.sum(0), gv.sum(0)]), n, ctx.pg).unbind(0)
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
            if ctx.kernels:  # g * a + (x - centre) * B + dmean_in / L - B * (mean_in - centre)
                coef_c = d_mean_in / length - coef_b * (mean_in - centre_nc)
                grad_x = ctx.kernels.grad_input(grad_y, x, centre_k, a.to(acc), coef_b.to(acc), coef_c.to(acc))
                return _grads(grad_x, grad_weight, grad_bias, grad_pm, grad_pv, weight, bias, mean_probs, var_probs)
            b3, a3 = lay.stat(coef_b.to(acc)), lay.stat(a.to(acc))
            if ctx.shifted:  # (x - shift) * B + dmean_in / L - B * (mean_in - shift)
                c3 = lay.stat((d_mean_in / length - coef_b * (mean_in - centre_nc)).to(acc))
                torch.sub(v, shift, out=buf)
                affine(buf, b3, c3, buf, ctx.fast_kernels)
            else:  # x * B + dmean_in / L - B * mean_in: well conditioned (checked in the forward)
                c3 = lay.stat((d_mean_in / length - coef_b * mean_in).to(acc))
                affine(v, b3, c3, buf, ctx.fast_kernels)
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
        None, None, None,
    )


def _exporting() -> bool:
    """True while tracing or exporting: then the plain-op formulation runs instead of the autograd.Function."""
    if torch.jit.is_tracing():
        return True
    if _in_onnx_export():
        return True
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(is_exporting is not None and is_exporting())


def _onnx_export_flags():
    """torch.onnx.is_in_onnx_export without its two imports per call (a microsecond, on every SN layer call): the
    flags it reads, found once; the public function where they are not where this torch keeps them."""
    try:
        from torch.onnx._internal.exporter import _flags
        from torch.onnx._internal.torchscript_exporter._globals import GLOBALS
    except ImportError:
        return torch.onnx.is_in_onnx_export
    return lambda: GLOBALS.in_onnx_export or _flags._is_onnx_exporting


_in_onnx_export = _onnx_export_flags()


def takes_whole_layer(x: Tensor) -> bool:
    """True when an SN layer on x runs as one operator of the CPU kernel (`cpu_kernels.switch_norm`): CPU eager mode,
    an input the kernel `fits`, the kernel built and switched on. Synchronised statistics never do (checked by the
    caller)."""
    return cpu_kernels.fits(x) and cpu_kernels.active() and _fast_allowed(x)


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
    if x.dim() < 3 or x.numel() == 0:
        return _reference.switch_norm_reference(
            x, weight, bias, mean_probs, var_probs, running_mean, running_var, terms=terms, training=training,
            momentum=momentum, eps=eps, using_moving_average=using_moving_average,
            ghost_batch_size=ghost_batch_size, process_group=process_group,
        )
    terms = tuple(terms)
    use_bn = "bn" in terms
    pg = resolve_process_group(process_group) if (training and use_bn) else None
    check_sync_or_ghost(pg, ghost_batch_size)
    k = ghost_group_size(x.shape[0], ghost_batch_size) if (training and use_bn) else x.shape[0]
    if pg is None and takes_whole_layer(x):
        # one operator per layer and direction: statistics, mixing, output and the running update
        return cpu_kernels.switch_norm(
            x, weight, bias, mean_probs, var_probs, cpu_kernels.term_slots(terms), k,
            running_mean if use_bn else None, running_var if use_bn else None, training, momentum,
            using_moving_average, eps,
        )
    rm = None if training or not use_bn else running_mean
    rv = None if training or not use_bn else running_var
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or bias.requires_grad or mean_probs.requires_grad
        or var_probs.requires_grad
    )
    exporting = _exporting()
    plan = _Plan(terms, training, eps, k, pg, _fast_allowed(x))
    if needs_grad and not exporting:
        y, mean_g, var_g = _SwitchNormFunction.apply(x, weight, bias, mean_probs, var_probs, rm, rv, plan)
        group = None if mean_g is None else (mean_g, var_g)
    else:
        y, group, _ = _core_forward(
            x, weight, bias, mean_probs, var_probs, rm, rv, plan, inplace=not (needs_grad or exporting)
        )
    if training and use_bn:
        mean_g, var_g = group
        _reference.update_running_stats(
            running_mean, running_var, mean_g.unsqueeze(-1), var_g.unsqueeze(-1), momentum, using_moving_average
        )
    return y
