"""Frozen SN: an eval-mode SN layer as constants, for export and for fine-tuning with fixed statistics.

A `FrozenSwitchNorm` computes its importance weights (softmax, or sparsestmax for SSN) once and folds the BN
term's running statistics with them into per-channel constants, so its output is one multiply-add with a
per-(sample, channel) scale and shift:

    mean  = p_in * mean_in + p_ln * mean_ln + p_bn * running_mean    (var alike, with the variance weights)
    scale = weight * rsqrt(var + eps),   shift = bias - mean * scale,   y = x * scale + shift
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from snzoo.nn import functional as F_sn
from snzoo.nn.norm_act import SwitchNormAct2d
from snzoo.nn.switchnorm import _SwitchNorm


def _expand_channels(t: Tensor, dim: int) -> Tensor:
    """(N or 1, C) -> broadcastable against an input of `dim` dimensions (N, C, *spatial)."""
    for _ in range(dim - 2):
        t = t.unsqueeze(-1)
    return t


class FrozenSwitchNorm(nn.Module):
    """An eval-mode SN layer with constant importance weights, computed in the fused formulation.

    Built from any SN layer (SwitchNorm1d/2d/3d, SyncSwitchNorm2d, SparseSwitchNorm2d); equal to that layer in
    eval mode. The statistics are the ones of `snzoo.nn.functional` (unbiased IN variance, LN built from the IN
    moments). IN and LN terms whose mean and variance weights are both zero (common with SSN) are left out of
    the graph; a layer with only the BN term is a per-channel affine map with constant scale and shift. The
    forward is scriptable, so `torch.jit.script` keeps its handling of any spatial size.
    """

    def __init__(self, layer: _SwitchNorm) -> None:
        super().__init__()
        c = layer.num_features
        with torch.no_grad():  # no gradient, so an SSN layer in training mode does not fix its weights here
            mean_probs, var_probs = layer.importance_weights()
        p = {t: float(w) for t, w in zip(layer.terms, mean_probs.detach().cpu().tolist())}
        q = {t: float(w) for t, w in zip(layer.terms, var_probs.detach().cpu().tolist())}
        self.num_features = c
        self.eps = float(layer.eps)
        self.mean_in, self.var_in = p.get("in", 0.0), q.get("in", 0.0)
        self.mean_ln, self.var_ln = p.get("ln", 0.0), q.get("ln", 0.0)
        self.use_in = self.mean_in != 0.0 or self.var_in != 0.0
        self.use_ln = self.mean_ln != 0.0 or self.var_ln != 0.0
        self.per_sample = self.use_in or self.use_ln
        # SwitchNorm1d on (N, C) takes the LN variance over C unbiased, as the layer does (biased for C == 1).
        self.flat_correction = 1 if c > 1 else 0

        dtype = layer.weight.dtype
        # The constants are folded in float64 and rounded once, so they are as exact as the eager layer's.
        weight = layer.weight.detach().reshape(1, c).double()
        bias = layer.bias.detach().reshape(1, c).double()
        if layer.using_bn and "bn" in p:
            bn_mean = p["bn"] * layer.running_mean.detach().reshape(1, c).double()
            bn_var = q["bn"] * layer.running_var.detach().reshape(1, c).double()
        else:
            bn_mean = torch.zeros(1, c, dtype=torch.float64, device=weight.device)
            bn_var = torch.zeros(1, c, dtype=torch.float64, device=weight.device)
        scale = weight * torch.rsqrt(bn_var + self.eps)
        for name, value in (
            ("weight", weight),
            ("bias", bias),
            ("bn_mean", bn_mean),
            ("bn_var_eps", bn_var + self.eps),  # the BN variance term with eps added once
            ("scale", scale),  # used only without per-sample terms
            ("shift", bias - bn_mean * scale),
        ):
            self.register_buffer(name, value.to(dtype))

    def forward(self, x: Tensor) -> Tensor:
        return self._normalize(x)

    def _normalize(self, x: Tensor) -> Tensor:
        if self.per_sample:
            scale, shift = self._per_sample_scale_shift(x)
        else:
            scale, shift = self.scale, self.shift
        return x * _expand_channels(scale, x.dim()) + _expand_channels(shift, x.dim())

    def _per_sample_scale_shift(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mean = self.bn_mean
        var = self.bn_var_eps
        if x.dim() == 2:
            var_ln, mean_ln = torch.var_mean(x, dim=1, keepdim=True, correction=self.flat_correction)
        else:
            mean_in, var_in = F_sn.instance_stats(x.flatten(2))
            mean_in, var_in = mean_in.squeeze(2), var_in.squeeze(2)
            if self.use_in:
                mean = mean + self.mean_in * mean_in
                var = var + self.var_in * var_in
            mean_ln, var_ln = F_sn.layer_stats(mean_in, var_in + mean_in * mean_in)
        if self.use_ln:
            mean = mean + self.mean_ln * mean_ln
            var = var + self.var_ln * var_ln
        scale = self.weight * torch.rsqrt(var)
        return scale, self.bias - mean * scale

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, mean weights (in, ln)=({self.mean_in:.4g}, {self.mean_ln:.4g}), "
            f"var weights (in, ln)=({self.var_in:.4g}, {self.var_ln:.4g}), per_sample={self.per_sample}"
        )


class FrozenSwitchNormAct(FrozenSwitchNorm):
    """A frozen `SwitchNormAct2d`: FrozenSwitchNorm, then (copies of) the layer's dropout and activation."""

    def __init__(self, layer: SwitchNormAct2d) -> None:
        super().__init__(layer)
        self.drop = copy.deepcopy(layer.drop)
        self.act = copy.deepcopy(layer.act)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(self._normalize(x)))


def _frozen_layer(layer: _SwitchNorm) -> FrozenSwitchNorm:
    return FrozenSwitchNormAct(layer) if isinstance(layer, SwitchNormAct2d) else FrozenSwitchNorm(layer)


def frozen_copy(model: nn.Module) -> nn.Module:
    """An eval-mode float32 CPU copy of `model` whose SN layers are `FrozenSwitchNorm`s, without gradients.

    The model itself is not changed: its SN layers are not copied at all, and the rest is deep-copied.
    """
    layers = [m for m in model.modules() if isinstance(m, _SwitchNorm)]
    # deepcopy takes what the memo holds for an object, so the copy gets the frozen layers in their places.
    memo = {id(layer): _frozen_layer(layer) for layer in layers}
    frozen = copy.deepcopy(model, memo) if not isinstance(model, _SwitchNorm) else memo[id(model)]
    return frozen.float().cpu().eval().requires_grad_(False)
