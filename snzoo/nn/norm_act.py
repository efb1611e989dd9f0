"""SN followed by an activation: `norm_relu` for models that call a norm layer and then a ReLU, and
`SwitchNormAct2d`, what timm's norm + activation layers (BatchNormAct2d, GroupNormAct...) convert to.

An SN layer whose call is one operator of the CPU kernel takes the ReLU into that operator: the clamp happens in its
output pass, so the activation costs no pass over memory of its own (in eval that pass is as much time as a whole
BatchNorm layer's). The values are the same as the two calls'.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module

from snzoo.nn.switchnorm import SwitchNorm2d, _SwitchNorm


def _hooked(*modules: nn.Module) -> bool:
    """True when a call of one of `modules` runs hooks (its own or global ones), as nn.Module's call tests."""
    if (_module._global_forward_hooks or _module._global_forward_pre_hooks or _module._global_backward_hooks
            or _module._global_backward_pre_hooks):
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
               for m in modules)


def norm_relu(norm: nn.Module, relu: nn.Module, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
    """relu(norm(x)), or relu(norm(x) + residual): a ResNet's norm + ReLU, and the end of its residual block.

    Where `norm` is an SN layer, `relu` a plain nn.ReLU, the residual (if any) in x's shape, strides and dtype, and
    the layer's call one operator of the CPU kernel, that operator adds and clamps in its output pass: the same values
    (the sum is rounded as `+` rounds it), without the passes over memory of the separate operations; in training its
    backward masks the gradient as ReLU's own does. Modules with hooks, and FX tracing, get the separate calls, so that
    they see what they always saw."""
    if type(relu) is nn.ReLU and isinstance(norm, _SwitchNorm) and not isinstance(x, torch.fx.Proxy) \
            and (residual is None or _same_layout(residual, x)) and not _hooked(norm, relu):
        y = norm._relu_forward(x, residual)
        if y is not None:
            return y
    return relu(norm(x)) if residual is None else relu(norm(x) + residual)


def _same_layout(residual: Tensor, x: Tensor) -> bool:
    return (type(residual) is Tensor and residual.dtype == x.dtype and residual.shape == x.shape
            and residual.stride() == x.stride() and residual.device == x.device)


class SwitchNormAct2d(SwitchNorm2d):
    """SwitchNorm2d, then `drop`, then `act`: what `convert_to_switchnorm` puts where a timm norm + activation
    layer was. It keeps the converted layer's `drop` and `act` modules (and so their settings), and its state dict
    keys are SwitchNorm2d's plus whatever the activation holds, under the same module name as the source. Without
    dropout and with a plain nn.ReLU, the ReLU runs inside the kernel's operator (as `norm_relu`)."""

    def __init__(
        self, num_features: int, *args, drop: Optional[nn.Module] = None, act: Optional[nn.Module] = None, **kwargs
    ) -> None:
        """SwitchNorm2d's arguments, plus the dropout (or drop-path) and activation modules to apply after it."""
        super().__init__(num_features, *args, **kwargs)
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        if type(self.drop) is nn.Identity and type(self.act) is nn.ReLU and not isinstance(x, torch.fx.Proxy) \
                and not _hooked(self.drop, self.act):
            y = self._relu_forward(x)
            if y is not None:
                return y
        return self.act(self.drop(super().forward(x)))


__all__ = ["SwitchNormAct2d", "norm_relu"]
