"""Sparsemax and sparsestmax: the importance-weight maps of Sparse Switchable Normalization (SSN).

sparsestmax(v, r) projects v onto the probability simplex (sparsemax) and then pushes the result out of
the ball of radius r around the centre of its support, so that the weights become one-hot as r grows to 1.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


_AT_CENTRE = 1e-6


def sparsemax(v: Tensor) -> Tensor:
    """Euclidean projection of a 1-D vector onto the probability simplex (differentiable)."""
    z, _ = torch.sort(v, descending=True)
    cssv = z.cumsum(0) - 1
    k = torch.arange(1, v.numel() + 1, dtype=v.dtype, device=v.device)
    support = (z - cssv / k) > 0
    rho = int(support.nonzero().max()) + 1
    tau = cssv[rho - 1] / rho
    return torch.clamp(v - tau, min=0)


def is_one_hot(w: Tensor) -> bool:
    """True when a probability vector puts all its mass on one entry (exactly, as the original tests it)."""
    return bool(w.max() - w.min() == 1)


def sparsestmax(v: Tensor, radius: float, _parent_centre: Optional[Tensor] = None) -> Tensor:
    """Sparsemax of v, moved to distance `radius` from the centre of its support when it lies inside.

    The offset from the centre is measured within the simplex (its rounding component along the all-ones
    direction is removed: in float32, sparsemax([1, 1, 1]) misses the centre by ~1e-8 along that direction,
    and stretching that error to length r would leave the simplex). When the sparsemax is at the centre of
    its support (offset below 1e-6, where the original divides by zero) it is returned unchanged.
    """
    w = sparsemax(v)
    if is_one_hot(w):
        return w
    support = (w > 0).to(w.dtype)
    centre = support / support.sum()
    if _parent_centre is None:
        r = radius
    else:
        r = math.sqrt(max(radius**2 - float((centre - _parent_centre).pow(2).sum()), 0.0))
    offset = w - centre
    offset = offset - support * (offset.sum() / support.sum())
    distance = offset.norm()
    if distance >= r or distance < _AT_CENTRE:
        return w
    p = centre + r * offset / distance
    if p.min() < 0:
        return sparsestmax(p, r, centre)
    return torch.clamp(p, 0, 1)
