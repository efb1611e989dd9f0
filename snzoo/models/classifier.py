"""What every snzoo classifier shares: the pooled head, its replacement, and the convolution init rule."""

from __future__ import annotations

import math
import warnings
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from snzoo.models._features import FeatureInfo, Indices, run_stages, take_indices


class PooledClassifier(nn.Module):
    """Base of the ResNets: subclasses build the trunk and `forward_features`; this adds the head.

    The head is adaptive average pooling, dropout and a linear layer `fc` (keys `fc.weight`, `fc.bias`).
    Subclasses also describe their trunk as stages (`_set_stages`), which gives `feature_info` and
    `forward_intermediates`.
    """

    num_features: int
    num_classes: int
    first_conv = "conv1"  # the convolution that sees the input channels (adapted for another in_chans)
    feature_stages: tuple[tuple[str, ...], ...]
    feature_info: FeatureInfo

    def _set_stages(self, stages: Sequence[Sequence[str]], info: Sequence[Mapping[str, Any]]) -> None:
        """Record the trunk as stages of top-level module names, run in order, and each stage's output."""
        self.feature_stages = tuple(tuple(names) for names in stages)
        self.feature_info = FeatureInfo(info, range(len(info)))

    def forward_intermediates(
        self,
        x: Tensor,
        indices: Indices = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[list[Tensor], tuple[Tensor, list[Tensor]]]:
        """The feature maps of the stages in `indices` (None: all; an int n: the last n; a list: those), as
        timm's forward_intermediates: (final features, intermediates), or the intermediates alone.

        The final features are forward_features' (unless stop_early ends the trunk at the last stage asked for).
        norm is accepted for timm's callers and changes nothing: a v2 model's final norm and ReLU belong to its
        last stage, so every stage output is already what the next layer or the head reads.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take = take_indices(len(self.feature_stages), indices)
        stages = self.feature_stages[: max(take) + 1] if stop_early or intermediates_only else self.feature_stages
        final, intermediates = run_stages(self._modules, stages, x, take)
        return intermediates if intermediates_only else (final, intermediates)

    def _make_head(self, num_features: int, num_classes: int, drop_rate: float) -> None:
        self.num_features = num_features
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.drop_rate = drop_rate
        self.dropout = nn.Dropout(p=drop_rate)
        self.num_classes = num_classes
        self.fc = nn.Linear(num_features, num_classes) if num_classes else nn.Identity()

    def _init_convs(self) -> None:
        # The original's rule: normal(0, sqrt(2 / (k * k * out_channels))); fc keeps PyTorch's default.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
                nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))

    def forward_features(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Pool, dropout and classify a feature map; pre_logits returns the pooled features."""
        x = torch.flatten(self.avgpool(x), 1)
        if pre_logits:
            return x
        return self.fc(self.dropout(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the classifier with a freshly initialised one for num_classes (0: no classifier).

        global_pool is timm's argument: None or "avg" (the only pooling these models have) are accepted.
        """
        if global_pool not in (None, "avg"):
            raise ValueError(f"global_pool must be 'avg' (or None), got {global_pool!r}: the head always averages")
        self.num_classes = num_classes
        device = next(self.parameters()).device
        self.fc = nn.Linear(self.num_features, num_classes).to(device) if num_classes else nn.Identity()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's switch for activation checkpointing; accepted, but activations are always kept.

        Recomputing a block in the backward pass would run its SN / BN layers a second time in training mode
        and update their running statistics twice per step, so the trained model would not be the one the
        recipe describes. enable=True warns that memory use stays as it is.
        """
        self.grad_checkpointing = False
        if enable:
            warnings.warn(f"{type(self).__name__} does not checkpoint activations (its norm layers' running "
                          f"statistics would be updated twice); training runs with memory use unchanged",
                          UserWarning, stacklevel=2)
