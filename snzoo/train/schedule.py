"""Per-iteration schedules of the recipes: the learning rate and the SSN sparsestmax radius."""

from __future__ import annotations

import math
from typing import Mapping


def learning_rate(schedule: Mapping, peak: float, epoch: int, iteration: int, iters_per_epoch: int, epochs: int,
                  total_iters: int | None = None) -> float:
    """The learning rate at (epoch, iteration within the epoch).

    cosine: linear warm-up from 0 over `warmup_epochs` (per iteration: peak * t / warmup_iters, t counted from 0),
    then per-iteration cosine from peak to 0 over the remaining iterations.
    step: peak * gamma ** (number of milestones passed): `milestones` in epochs (changing at epoch boundaries), or
    `milestone_iters` in iterations (the detection schedules: x0.1 at 120k and 160k of 180k).
    poly: peak * (1 - t / total) ** power (the DeepLab schedules).
    Warm-up: `warmup_epochs` rises linearly from 0; `warmup_iters` rises linearly from peak * `warmup_factor`
    (Detectron's linear warm-up: 1/3 over 500 iterations).
    total_iters: the run's iterations when the recipe counts them (`iterations`), else epochs x iters_per_epoch.
    """
    t = epoch * iters_per_epoch + iteration
    total = total_iters or epochs * iters_per_epoch
    warmup = int(round(schedule.get("warmup_epochs", 0) * iters_per_epoch))
    if t < warmup:
        return peak * t / warmup
    kind = schedule["type"]
    if kind == "cosine":
        lr = 0.5 * peak * (1.0 + math.cos(math.pi * (t - warmup) / max(1, total - warmup)))
    elif kind == "poly":
        lr = peak * max(0.0, 1.0 - t / total) ** schedule.get("power", 0.9)
    elif "milestone_iters" in schedule:
        lr = peak * schedule.get("gamma", 0.1) ** sum(1 for m in schedule["milestone_iters"] if t >= m)
    else:
        lr = peak * schedule.get("gamma", 0.1) ** sum(1 for m in schedule["milestones"] if epoch >= m)
    warmup_iters = schedule.get("warmup_iters", 0)
    if t < warmup_iters:
        alpha = t / warmup_iters
        lr *= schedule.get("warmup_factor", 1.0 / 3.0) * (1.0 - alpha) + alpha
    return lr


def sparsestmax_radius(epoch: int, iteration: int, iters_per_epoch: int, epochs: int) -> float:
    """The SSN radius schedule: the fraction of training done, rising from 0 to 1, set every iteration."""
    return (epoch * iters_per_epoch + iteration) / (epochs * iters_per_epoch)
