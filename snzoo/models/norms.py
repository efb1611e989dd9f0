"""The pluggable normalization of the ResNets: SN, SSN, or the BN / GN baselines."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import nn

from snzoo.nn import SparseSwitchNorm2d, SwitchNorm2d
from snzoo.nn.ghost_batchnorm import GhostBatchNorm2d

DEFAULT_MOMENTUM = {"sn": 0.9, "ssn": 0.997, "bn": 0.9, "gn": None}


@dataclass(frozen=True)
class NormFactory:
    """Builds the norm layers of one model; momentum weighs the old running value (SN convention) for all kinds."""

    kind: str
    using_bn: bool = True
    using_moving_average: bool = True
    momentum: Optional[float] = None
    eps: float = 1e-5
    last_gamma: bool = False
    gn_groups: int = 32

    def __post_init__(self) -> None:
        if self.kind not in DEFAULT_MOMENTUM:
            raise ValueError(f"norm must be one of {', '.join(DEFAULT_MOMENTUM)}, got {self.kind!r}")
        if self.momentum is None:
            object.__setattr__(self, "momentum", DEFAULT_MOMENTUM[self.kind])
        if self.kind != "sn" and not self.using_bn:
            raise ValueError(f"using_bn=False applies to norm 'sn' only, not {self.kind!r}")

    def config(self) -> dict:
        """The manifest's `norm` object for models built with this factory."""
        return {"type": self.kind, "using_bn": self.using_bn, "using_moving_average": self.using_moving_average,
                "momentum": self.momentum if self.momentum is not None else 0.9, "last_gamma": self.last_gamma}

    def __call__(self, num_features: int, last: bool = False) -> nn.Module:
        """A norm layer over num_features channels; `last` marks the last norm of a residual block."""
        zero_gamma = last and self.last_gamma
        if self.kind == "sn":
            return SwitchNorm2d(
                num_features, self.eps, self.momentum, self.using_moving_average, self.using_bn, zero_gamma
            )
        if self.kind == "ssn":
            return SparseSwitchNorm2d(num_features, self.eps, self.momentum, self.using_moving_average, zero_gamma)
        if self.kind == "bn":
            layer = GhostBatchNorm2d(num_features, eps=self.eps, momentum=1.0 - self.momentum)
        else:
            layer = nn.GroupNorm(min(self.gn_groups, num_features), num_features, eps=self.eps)
        if zero_gamma:
            nn.init.zeros_(layer.weight)
        return layer
