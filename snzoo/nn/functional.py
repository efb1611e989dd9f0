"""The math of switchable normalization, kept in one place so a faster implementation can replace it.

Every function works on the input viewed as (N, C, L), L being the flattened spatial size. The statistics
follow the released checkpoints exactly:

- IN: mean and *unbiased* variance over L for every (sample, channel).
- LN: the mean over C of the IN means; the variance as E_C[var_in + mean_in^2] - mean_ln^2.
- BN: the same construction over N (or over each ghost batch, or over every rank's samples).

So the LN and BN variances are built from the unbiased IN variance, neither plainly biased nor unbiased.
When L == 1 the unbiased IN variance is 0/0; snzoo defines it as 0 (the variance of a single value), which
turns the LN and BN variances into the ordinary biased variances over channels and samples.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional, Sequence

from torch import Tensor

from snzoo.nn._reference import (
    TERMS_SN, TERMS_SN1D, TERMS_SN_NO_BN, batch_stats, instance_stats, layer_stats, switch_norm_flat,
    switch_norm_reference, update_running_stats,
)
from snzoo.nn.fused import switch_norm_fused
from snzoo.nn.fused import takes_whole_layer as fused_takes_whole_layer

__all__ = [
    "IMPLEMENTATIONS", "TERMS_SN", "TERMS_SN1D", "TERMS_SN_NO_BN", "batch_stats", "get_implementation",
    "implementation_from_environment", "instance_stats", "layer_stats", "set_implementation", "switch_norm",
    "switch_norm_flat", "switch_norm_reference", "takes_whole_layer", "update_running_stats", "use_implementation",
]


IMPLEMENTATIONS = ("fused", "reference")


_implementation = "fused"


def set_implementation(name: str) -> str:
    """Choose what `switch_norm` runs: "fused" (the fast path of `snzoo.nn.fused`, the default) or "reference"
    (`switch_norm_reference`). Module-wide; the environment variable SNZOO_SN_IMPL sets it at import.
    Returns the previous choice."""
    global _implementation
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"unknown switch_norm implementation {name!r}; choose one of {IMPLEMENTATIONS}")
    previous, _implementation = _implementation, name
    return previous


@contextlib.contextmanager
def use_implementation(name: str) -> Iterator[None]:
    """Run `switch_norm` with implementation `name` inside the block, then restore the previous choice."""
    previous = set_implementation(name)
    try:
        yield
    finally:
        set_implementation(previous)


def get_implementation() -> str:
    """The implementation `switch_norm` runs now: "fused" or "reference"."""
    return _implementation


def switch_norm(
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
    """Switchable normalisation of x (N, C, *spatial); arguments and results as `switch_norm_reference`.

    Runs the implementation chosen by `set_implementation` / `use_implementation` (default "fused":
    `snzoo.nn.fused.switch_norm_fused`). Both give the same outputs, gradients and running-buffer updates up to
    rounding, synchronised statistics included.
    """
    fn = switch_norm_fused if _implementation == "fused" else switch_norm_reference
    return fn(
        x, weight, bias, mean_probs, var_probs, running_mean, running_var, terms=terms, training=training,
        momentum=momentum, eps=eps, using_moving_average=using_moving_average, ghost_batch_size=ghost_batch_size,
        process_group=process_group,
    )


def takes_whole_layer(x: Tensor) -> bool:
    """True when `switch_norm` on x, without synchronised statistics, is one operator call of the CPU kernel
    (`snzoo.nn.cpu_kernels.switch_norm`): the fused implementation is chosen and the kernel takes x
    (`snzoo.nn.fused.takes_whole_layer`). Layers call that operator directly then."""
    return _implementation == "fused" and fused_takes_whole_layer(x)


def implementation_from_environment() -> str:
    """The implementation named by the environment variable SNZOO_SN_IMPL ("fused" when unset or empty)."""
    name = os.environ.get("SNZOO_SN_IMPL", "").strip().lower() or "fused"
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"SNZOO_SN_IMPL={name!r} is not a switch_norm implementation; use one of {IMPLEMENTATIONS}")
    return name


set_implementation(implementation_from_environment())
