"""An independent float64 NumPy reference of Switchable Normalization, written from the equations.

Nothing here imports torch or snzoo: every statistic is spelled out from its definition, so the tests
compare snzoo's layers against a second, plainly written implementation of the same facts:

- x is viewed as (N, C, L), L = H*W (or D*H*W, or the L of a (N, C, L) SwitchNorm1d input).
- IN: mean over L and UNBIASED variance over L (divides by L - 1). snzoo's documented choice: when L == 1
  the unbiased variance is defined as 0.
- LN: mean over C of the IN means; variance = mean over C of (var_in + mean_in^2) - mean_ln^2.
- BN: the same construction over N (or over each ghost batch of k consecutive samples).
- Importance weights: softmax over the raw values (or any probability vectors, e.g. from sparsestmax).
- Eval: only the BN term uses the running buffers.
- Running updates: moving average (momentum weighs the OLD value) or batch-average accumulation
  (running_mean += mean_bn, running_var += mean_bn^2 + var_bn), finalised by finalize_batch_average.
- Ghost batches: the running update is the mean over groups of what each group's own buffer would get.
- SwitchNorm1d on (N, C): LN = mean and unbiased variance over C, BN = mean and unbiased variance over N.
- sparsemax and sparsestmax as the original SSN release defines them.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

AT_CENTRE = 1e-6  # snzoo's documented tolerance: sparsestmax returns w unchanged this close to the centre


# ----------------------------------------------------------------------------------------------- helpers
def softmax(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    e = np.exp(v - v.max())
    return e / e.sum()


def _unbiased_var(a: np.ndarray, axis: int) -> np.ndarray:
    """Unbiased variance along `axis` (keepdims); defined as 0 when there is a single value."""
    count = a.shape[axis]
    if count == 1:
        return np.zeros_like(np.mean(a, axis=axis, keepdims=True))
    mean = np.mean(a, axis=axis, keepdims=True)
    return np.sum((a - mean) ** 2, axis=axis, keepdims=True) / (count - 1)


def instance_stats(x3: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased variance over L of x viewed as (N, C, L); shapes (N, C, 1)."""
    x3 = np.asarray(x3, dtype=np.float64)
    mean = x3.sum(axis=2, keepdims=True) / x3.shape[2]
    return mean, _unbiased_var(x3, axis=2)


def layer_stats(mean_in: np.ndarray, var_in: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample statistics over channels, shapes (N, 1, 1)."""
    mean_ln = mean_in.mean(axis=1, keepdims=True)
    var_ln = (var_in + mean_in**2).mean(axis=1, keepdims=True) - mean_ln**2
    return mean_ln, var_ln


def batch_group_stats(mean_in: np.ndarray, var_in: np.ndarray, k: Optional[int] = None):
    """BN statistics of every group of k consecutive samples: (G, C, 1) means and variances."""
    n = mean_in.shape[0]
    k = n if k is None or k >= n else k
    assert n % k == 0
    means, variances = [], []
    for g in range(n // k):
        m_in = mean_in[g * k : (g + 1) * k]
        v_in = var_in[g * k : (g + 1) * k]
        m = m_in.mean(axis=0)
        v = (v_in + m_in**2).mean(axis=0) - m**2
        means.append(m)
        variances.append(v)
    return np.stack(means), np.stack(variances)


def running_update(
    running_mean: np.ndarray,
    running_var: np.ndarray,
    group_means: np.ndarray,
    group_vars: np.ndarray,
    momentum: float,
    using_moving_average: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """New running buffers from per-group batch statistics (one group without ghost batches).

    Every group updates its own copy of the buffers as a device would, and the result is their mean.
    """
    new_means, new_vars = [], []
    for m, v in zip(group_means, group_vars):
        m = m.reshape(running_mean.shape)
        v = v.reshape(running_var.shape)
        if using_moving_average:
            new_means.append(momentum * running_mean + (1 - momentum) * m)
            new_vars.append(momentum * running_var + (1 - momentum) * v)
        else:
            new_means.append(running_mean + m)
            new_vars.append(running_var + m**2 + v)
    return np.mean(new_means, axis=0), np.mean(new_vars, axis=0)


# ----------------------------------------------------------------------------------------- the SN forward
def switch_norm(
    x,
    weight,
    bias,
    mean_weight=None,
    var_weight=None,
    running_mean=None,
    running_var=None,
    *,
    training: bool = True,
    momentum: float = 0.9,
    eps: float = 1e-5,
    using_moving_average: bool = True,
    using_bn: bool = True,
    ghost_batch_size: Optional[int] = None,
    mean_probs=None,
    var_probs=None,
    terms: Optional[Sequence[str]] = None,
):
    """Reference SN forward of x (N, C, *spatial). Returns (y, running_mean, running_var) as new arrays.

    mean_probs / var_probs override the softmax of mean_weight / var_weight (e.g. sparsestmax weights).
    terms defaults to (in, ln, bn), or (in, ln) when using_bn is False; SwitchNorm1d on (N, C, L) uses (ln, bn).
    """
    x = np.asarray(x, dtype=np.float64)
    n, c = x.shape[:2]
    x3 = x.reshape(n, c, -1)
    if terms is None:
        terms = ("in", "ln", "bn") if using_bn else ("in", "ln")
    wm = softmax(mean_weight) if mean_probs is None else np.asarray(mean_probs, dtype=np.float64)
    wv = softmax(var_weight) if var_probs is None else np.asarray(var_probs, dtype=np.float64)
    assert len(wm) == len(terms) and len(wv) == len(terms)

    mean_in, var_in = instance_stats(x3)
    stats = {"in": (mean_in, var_in), "ln": layer_stats(mean_in, var_in)}
    rm = None if running_mean is None else np.array(running_mean, dtype=np.float64)
    rv = None if running_var is None else np.array(running_var, dtype=np.float64)
    if "bn" in terms:
        buf_shape = rm.shape
        if training:
            gm, gv = batch_group_stats(mean_in, var_in, ghost_batch_size)
            groups = gm.shape[0]
            k = n // groups
            stats["bn"] = (np.repeat(gm, k, axis=0), np.repeat(gv, k, axis=0))
            rm, rv = running_update(rm, rv, gm, gv, momentum, using_moving_average)
        else:
            stats["bn"] = (rm.reshape(1, c, 1), rv.reshape(1, c, 1))
        assert rm.shape == buf_shape

    mean = sum(wm[i] * stats[t][0] for i, t in enumerate(terms))
    var = sum(wv[i] * stats[t][1] for i, t in enumerate(terms))
    y = (x3 - mean) / np.sqrt(var + eps)
    y = y * np.asarray(weight, dtype=np.float64).reshape(1, c, 1) + np.asarray(bias, dtype=np.float64).reshape(1, c, 1)
    return y.reshape(x.shape), rm, rv


def switch_norm_1d_flat(
    x,
    weight,
    bias,
    mean_weight,
    var_weight,
    running_mean,
    running_var,
    *,
    training: bool = True,
    momentum: float = 0.997,
    eps: float = 1e-5,
    using_moving_average: bool = True,
    ghost_batch_size: Optional[int] = None,
):
    """Reference SwitchNorm1d on (N, C): LN = mean / unbiased var over C; BN = mean / unbiased var over N."""
    x = np.asarray(x, dtype=np.float64)
    n, c = x.shape
    wm, wv = softmax(mean_weight), softmax(var_weight)
    mean_ln = x.mean(axis=1, keepdims=True)
    var_ln = _unbiased_var(x, axis=1)
    rm = np.array(running_mean, dtype=np.float64)
    rv = np.array(running_var, dtype=np.float64)
    if training:
        k = n if ghost_batch_size is None or ghost_batch_size >= n else ghost_batch_size
        assert n % k == 0
        gm = np.stack([x[g * k : (g + 1) * k].mean(axis=0) for g in range(n // k)])
        gv = np.stack([_unbiased_var(x[g * k : (g + 1) * k], axis=0)[0] for g in range(n // k)])
        mean_bn = np.repeat(gm, k, axis=0)
        var_bn = np.repeat(gv, k, axis=0)
        rm, rv = running_update(rm, rv, gm, gv, momentum, using_moving_average)
    else:
        mean_bn, var_bn = rm.reshape(1, c), rv.reshape(1, c)
    mean = wm[0] * mean_ln + wm[1] * mean_bn
    var = wv[0] * var_ln + wv[1] * var_bn
    y = (x - mean) / np.sqrt(var + eps)
    y = y * np.asarray(weight, dtype=np.float64).reshape(1, c) + np.asarray(bias, dtype=np.float64).reshape(1, c)
    return y, rm, rv


# ------------------------------------------------------------------------------------ batch-average helper
def finalize_batch_average(sum_mean: np.ndarray, sum_second_moment: np.ndarray, count: int):
    """The original helper's last step: mean = sum / count; var = sum(E[x^2]) / count - mean^2."""
    mean = np.asarray(sum_mean, dtype=np.float64) / count
    var = np.asarray(sum_second_moment, dtype=np.float64) / count - mean**2
    return mean, var


def batch_average_stats(batches: Sequence[np.ndarray], buffer_shape=None):
    """Running statistics the batch-average helper ends with, for the SN inputs `batches` (each (N, C, ...))."""
    c = np.asarray(batches[0]).shape[1]
    shape = (1, c, 1) if buffer_shape is None else buffer_shape
    sum_mean = np.zeros(shape)
    sum_sq = np.zeros(shape)
    for b in batches:
        b = np.asarray(b, dtype=np.float64)
        mean_in, var_in = instance_stats(b.reshape(b.shape[0], c, -1))
        gm, gv = batch_group_stats(mean_in, var_in)
        sum_mean += gm[0].reshape(shape)
        sum_sq += (gm[0] ** 2 + gv[0]).reshape(shape)
    return finalize_batch_average(sum_mean, sum_sq, len(batches))


# --------------------------------------------------------------------------------- sparsemax / sparsestmax
def sparsemax(v) -> np.ndarray:
    """Sort descending, cumulative sums minus 1, rho = last k with z_k - cssv_k / k > 0, tau = cssv_rho / rho."""
    v = np.asarray(v, dtype=np.float64)
    z = np.sort(v)[::-1]
    cssv = np.cumsum(z) - 1.0
    rho = 0
    for k in range(1, len(z) + 1):
        if z[k - 1] - cssv[k - 1] / k > 0:
            rho = k
    tau = cssv[rho - 1] / rho
    return np.maximum(v - tau, 0.0)


def simplex_projection_bisection(v, iters: int = 200) -> np.ndarray:
    """Euclidean projection onto the simplex by bisection on tau in sum(max(v - tau, 0)) = 1 (independent check)."""
    v = np.asarray(v, dtype=np.float64)
    lo, hi = v.min() - 1.0, v.max()
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if np.maximum(v - mid, 0).sum() > 1:
            lo = mid
        else:
            hi = mid
    return np.maximum(v - 0.5 * (lo + hi), 0.0)


def sparsestmax(v, radius: float, parent_centre: Optional[np.ndarray] = None, trace: Optional[list] = None) -> np.ndarray:
    """The original's recursive sparsestmax, with the |w - u| == 0 case returning w (snzoo's choice).

    trace, when given, gets one entry a call (the tests use it to find inputs where recursion happens).
    """
    if trace is not None:
        trace.append(parent_centre is not None)
    w = sparsemax(v)
    if w.max() - w.min() == 1:
        return w
    support = (w > 0).astype(np.float64)
    u = support / support.sum()
    if parent_centre is None:
        r = float(radius)
    else:
        r = math.sqrt(max(radius**2 - float(np.sum((u - parent_centre) ** 2)), 0.0))
    distance = float(np.linalg.norm(w - u))
    if distance >= r or distance < AT_CENTRE:
        return w
    p = u + r * (w - u) / distance
    if p.min() < 0:
        return sparsestmax(p, r, u, trace)
    return np.clip(p, 0.0, 1.0)
