"""Per-iteration schedules of the recipes: the learning rate and the SSN sparsestmax radius."""

from __future__ import annotations

import math
from typing import Mapping


def learning_rate(schedule: Mapping, peak: float, epoch: int, iteration: int, iters_per_epoch: int, epochs: int) -> float:
    """The learning rate at (epoch, iteration within the epoch).

    cosine: linear warm-up from 0 over `warmup_epochs` (per iteration: peak * t / warmup_iters, t counted from 0),
    then per-iteration cosine from peak to 0 over the remaining iterations.
    step: peak * gamma ** (number of milestones <= epoch), changing at epoch boundaries, after an optional
    linear warm-up.
    """
    t = epoch * iters_per_epoch + iteration
    warmup = int(round(schedule.get("warmup_epochs", 0) * iters_per_epoch))
    if t < warmup:
        return peak * t / warmup
    if schedule["type"] == "cosine":
        total = epochs * iters_per_epoch
        progress = (t - warmup) / max(1, total - warmup)
        return 0.5 * peak * (1.0 + math.cos(math.pi * progress))
    passed = sum(1 for m in schedule["milestones"] if epoch >= m)
    return peak * schedule.get("gamma", 0.1) ** passed


def sparsestmax_radius(epoch: int, iteration: int, iters_per_epoch: int, epochs: int) -> float:
    """The SSN radius schedule: the fraction of training done, rising from 0 to 1, set every iteration."""
    return (epoch * iters_per_epoch + iteration) / (epochs * iters_per_epoch)
