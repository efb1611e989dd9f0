"""Sparse Switchable Normalization: SN whose importance weights come from sparsestmax."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from snzoo.nn.sparsestmax import is_one_hot, sparsestmax
from snzoo.nn.switchnorm import _SwitchNorm, _reusable_outside_autograd


class SparseSwitchNorm2d(_SwitchNorm):
    """SN over (N, C, H, W) whose importance weights are sparsestmax(raw, radius) instead of softmax.

    Buffers beside SN's: `radius` (set every iteration by the training schedule, 0 -> 1) and the flags
    `mean_fixed` / `var_fixed`. Once a weight vector becomes one-hot in training, its flag is set, the raw
    parameter is overwritten with the one-hot vector and from then on used as it is, without gradient.
    Fixing happens only in training with gradients enabled (not in eval or no-grad statistics passes).
    """

    input_dims = (4,)
    kernel_inputs = _SwitchNorm.kernel_inputs + ("radius", "mean_fixed", "var_fixed")
    importance_inputs = ("mean_weight", "var_weight", "radius", "mean_fixed", "var_fixed")
    softmax_importance = False

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.997,
        using_moving_average: bool = True,
        last_gamma: bool = False,
        *,
        device: Optional[torch.device | str] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, using_moving_average, using_bn=True, last_gamma=last_gamma,
                         device=device, dtype=dtype)
        # The flags stay integers whatever dtype is asked for (as BatchNorm's num_batches_tracked).
        self.register_buffer("mean_fixed", torch.zeros(1, dtype=torch.long, device=device))
        self.register_buffer("var_fixed", torch.zeros(1, dtype=torch.long, device=device))
        self.register_buffer("radius", torch.zeros(1, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "mean_fixed"):
            self.mean_fixed.zero_()
            self.var_fixed.zero_()

    def set_radius(self, radius: float) -> None:
        """Set the sparsestmax radius (0 gives sparsemax; weights become one-hot as it approaches 1)."""
        self.radius.fill_(radius)

    def _weights(self, raw: nn.Parameter, fixed: Tensor) -> Tensor:
        if bool(fixed.item()):
            # The one-hot of the stored vector: equal to it, and immune to weight decay applied to zero grads.
            return torch.nn.functional.one_hot(raw.detach().argmax(), raw.numel()).to(raw.dtype)
        w = sparsestmax(raw, float(self.radius.item()))
        # Only a gradient step may fix a vector, not statistics passes (finalize_batch_average runs no_grad).
        if self.training and torch.is_grad_enabled() and is_one_hot(w):
            with torch.no_grad():
                raw.copy_(w)
                fixed.fill_(1)
        return w

    def importance_weights(self) -> tuple[Tensor, Tensor]:
        # The raw weights among the inputs: in eval (norm_eval fine-tuning) a gradient must still reach them.
        if (self.training and torch.is_grad_enabled()) or not _reusable_outside_autograd(
                self.mean_weight, self.var_weight, self.radius, self.mean_fixed, self.var_fixed):
            return self._weights(self.mean_weight, self.mean_fixed), self._weights(self.var_weight, self.var_fixed)
        # Without a gradient step the weights change only when their inputs do: sparsestmax is a few dozen small
        # operations, as long as a small layer's normalisation itself, so eval reuses the last result.
        key = tuple((t.data_ptr(), t._version, t.dtype) for t in
                    (self.mean_weight, self.var_weight, self.radius, self.mean_fixed, self.var_fixed))
        cached = self.__dict__.get("_eval_weights")
        if cached is None or cached[0] != key:
            with torch.no_grad():
                weights = (self._weights(self.mean_weight, self.mean_fixed),
                           self._weights(self.var_weight, self.var_fixed))
            cached = self.__dict__["_eval_weights"] = (key, weights)
        return cached[1]

    def extra_repr(self) -> str:
        return super().extra_repr() + f", radius={float(self.radius.item()):.4g}"
