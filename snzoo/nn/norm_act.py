"""SN followed by the dropout and activation of timm's norm + activation layers (BatchNormAct2d, GroupNormAct...)."""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from snzoo.nn.switchnorm import SwitchNorm2d


class SwitchNormAct2d(SwitchNorm2d):
    """SwitchNorm2d, then `drop`, then `act`: what `convert_to_switchnorm` puts where a timm norm + activation
    layer was. It keeps the converted layer's `drop` and `act` modules (and so their settings), and its state dict
    keys are SwitchNorm2d's plus whatever the activation holds, under the same module name as the source."""

    def __init__(
        self, num_features: int, *args, drop: Optional[nn.Module] = None, act: Optional[nn.Module] = None, **kwargs
    ) -> None:
        """SwitchNorm2d's arguments, plus the dropout (or drop-path) and activation modules to apply after it."""
        super().__init__(num_features, *args, **kwargs)
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(super().forward(x)))


__all__ = ["SwitchNormAct2d"]
