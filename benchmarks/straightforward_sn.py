"""The straightforward formulation of Switchable Normalization: the speed anchor of the SN benchmarks.

This is SN written the way the equations read, as one plain nn.Module with autograd through every step:

- x viewed as (N, C, L), L = H*W;
- IN: mean and unbiased variance over L (torch.var_mean);
- LN and BN built from the IN statistics: mean = average of the IN means, variance = E[var_in + mean_in^2]
  - mean^2, over channels (LN) or samples (BN);
- BN running buffers by moving average (momentum weighs the old value) or batch-average accumulation;
- softmax importance weights mixing the three means and the three variances;
- (x - mean) / sqrt(var + eps) * weight + bias.

It deliberately does not import snzoo.nn.functional: the benchmarks report snzoo's SN as a ratio against this
module, so the anchor has to stay put when snzoo's implementation changes. Parameter and buffer names match
snzoo's SwitchNorm2d, so `swap_in_straightforward` moves a model's state over key for key.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class StraightforwardSwitchNorm2d(nn.Module):
    """SwitchNorm over (N, C, H, W) written out directly; same parameters, buffers and results as snzoo's.

    Ghost batches and synchronised statistics are not part of the anchor.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.9,
        using_moving_average: bool = True,
        using_bn: bool = True,
        last_gamma: bool = False,
    ) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.using_moving_average = using_moving_average
        self.using_bn = using_bn
        self.last_gamma = last_gamma
        self.weight = nn.Parameter(torch.full((1, num_features, 1, 1), 0.0 if last_gamma else 1.0))
        self.bias = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        terms = 3 if using_bn else 2
        self.mean_weight = nn.Parameter(torch.ones(terms))
        self.var_weight = nn.Parameter(torch.ones(terms))
        if using_bn:
            self.register_buffer("running_mean", torch.zeros(1, num_features, 1))
            self.register_buffer("running_var", torch.zeros(1, num_features, 1))

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        x3 = x.reshape(n, c, h * w)
        # Under autocast the statistics stay float32, as every norm layer of an AMP model keeps them.
        if x3.dtype in (torch.float16, torch.bfloat16):
            x3 = x3.float()
        if h * w == 1:
            # The unbiased variance of a single value is 0/0; taken as 0, the convention snzoo documents.
            mean_in, var_in = x3, torch.zeros_like(x3)
        else:
            var_in, mean_in = torch.var_mean(x3, dim=2, keepdim=True, correction=1)
        second_moment = var_in + mean_in**2

        mean_ln = mean_in.mean(1, keepdim=True)
        var_ln = second_moment.mean(1, keepdim=True) - mean_ln**2

        mean_weight = torch.softmax(self.mean_weight, 0)
        var_weight = torch.softmax(self.var_weight, 0)
        mean = mean_weight[0] * mean_in + mean_weight[1] * mean_ln
        var = var_weight[0] * var_in + var_weight[1] * var_ln

        if self.using_bn:
            if self.training:
                mean_bn = mean_in.mean(0, keepdim=True)
                var_bn = second_moment.mean(0, keepdim=True) - mean_bn**2
                with torch.no_grad():
                    if self.using_moving_average:
                        self.running_mean.mul_(self.momentum).add_((1 - self.momentum) * mean_bn)
                        self.running_var.mul_(self.momentum).add_((1 - self.momentum) * var_bn)
                    else:
                        self.running_mean.add_(mean_bn)
                        self.running_var.add_(mean_bn**2 + var_bn)
            else:
                mean_bn, var_bn = self.running_mean, self.running_var
            mean = mean + mean_weight[2] * mean_bn
            var = var + var_weight[2] * var_bn

        y = (x3 - mean) / (var + self.eps).sqrt()
        y = y * self.weight.reshape(1, c, 1) + self.bias.reshape(1, c, 1)
        return y.to(x.dtype).reshape(n, c, h, w)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"using_moving_average={self.using_moving_average}, using_bn={self.using_bn}")


def swap_in_straightforward(model: nn.Module) -> nn.Module:
    """Replace every snzoo SwitchNorm2d of `model` (in place) by the straightforward module; returns the model.

    Parameters, buffers, device, dtype and train/eval mode are carried over, so the state_dict keys and
    values are unchanged. A bare SwitchNorm2d passed in comes back as its replacement. Raises ValueError for
    layers with ghost batches or synchronised statistics.
    """
    from snzoo.nn import SwitchNorm2d

    if isinstance(model, SwitchNorm2d):
        return _straightforward_copy("the layer", model)
    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, SwitchNorm2d)]
    for name, old in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, _straightforward_copy(name, old))
    return model


def _straightforward_copy(name: str, old: nn.Module) -> StraightforwardSwitchNorm2d:
    if old.ghost_batch_size is not None or old.process_group is not None:
        raise ValueError(f"{name}: ghost batches and synchronised statistics are not part of the anchor")
    new = StraightforwardSwitchNorm2d(
        old.num_features, old.eps, old.momentum, old.using_moving_average, old.using_bn, old.last_gamma
    )
    new.load_state_dict(old.state_dict())
    new.to(device=old.weight.device, dtype=old.weight.dtype)
    new.train(old.training)
    return new
