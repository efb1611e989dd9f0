"""What every snzoo classifier shares: the pooled head, its replacement, and the convolution init rule."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class PooledClassifier(nn.Module):
    """Base of the ResNets: subclasses build the trunk and `forward_features`; this adds the head.

    The head is adaptive average pooling, dropout and a linear layer `fc` (keys `fc.weight`, `fc.bias`).
    """

    num_features: int
    num_classes: int

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

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier with a freshly initialised one for num_classes (0: no classifier)."""
        self.num_classes = num_classes
        device = next(self.parameters()).device
        self.fc = nn.Linear(self.num_features, num_classes).to(device) if num_classes else nn.Identity()
