"""The CIFAR-style ResNet of He et al. 2016 (section 4.2) for small images, with the same pluggable norm.

Depth is 6n+2: a 3x3 stem with 16 channels (no max-pool, so 28x28 or 32x32 inputs keep their resolution),
three stages of n BasicBlocks with 16/32/64 channels, average pooling and fc. Module names follow the
ImageNet v1 model (conv1, sn1, layer1..layer3, downsample.0 / downsample.1, fc), so the same tooling reads
both.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from snzoo.models.classifier import PooledClassifier
from snzoo.models.norms import NormFactory
from snzoo.models.registry import register_architecture
from snzoo.models.resnet import BasicBlockV1, conv1x1, conv3x3
from snzoo.nn import norm_relu

DEPTHS = (20, 32, 56)
WIDTHS = (16, 32, 64)


class ResNetCifar(PooledClassifier):
    """CIFAR ResNet-(6n+2) v1 with SN, SSN, BN or GN and projection (option B) shortcuts.

    momentum follows the SN convention (weight of the old value) for every norm; last_gamma zero-initialises
    the last norm of each block. gn_groups defaults to 8 because the stages are only 16 to 64 channels wide.
    """

    def __init__(
        self,
        depth: int = 20,
        norm: str = "sn",
        num_classes: int = 10,
        in_chans: int = 1,
        drop_rate: float = 0.0,
        using_bn: bool = True,
        using_moving_average: bool = True,
        momentum: Optional[float] = None,
        eps: float = 1e-5,
        last_gamma: bool = True,
        gn_groups: int = 8,
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2 with n >= 1 (e.g. {', '.join(map(str, DEPTHS))}), got {depth}")
        factory = NormFactory(norm, using_bn, using_moving_average, momentum, eps, last_gamma, gn_groups)
        self.norm_config = factory.config()  # what an exported zoo entry records under `norm`
        blocks = (depth - 2) // 6
        self.depth, self.version, self.norm = depth, 1, norm
        self.inplanes = WIDTHS[0]
        self.conv1 = conv3x3(in_chans, WIDTHS[0])
        self.sn1 = factory(WIDTHS[0])
        self.relu = nn.ReLU(inplace=True)
        for index, width in enumerate(WIDTHS):
            stride = 1 if index == 0 else 2
            setattr(self, f"layer{index + 1}", self._make_layer(width, blocks, stride, factory))
        self._make_head(WIDTHS[-1], num_classes, drop_rate)
        self._init_convs()
        # Stages for features: 0 the stem after its ReLU (full resolution), 1-3 layer1..layer3.
        self._set_stages(
            [("conv1", "sn1", "relu"), ("layer1",), ("layer2",), ("layer3",)],
            [{"num_chs": c, "reduction": r, "module": m}
             for c, r, m in zip((WIDTHS[0],) + WIDTHS, (1, 1, 2, 4), ("relu", "layer1", "layer2", "layer3"))],
        )

    def _make_layer(self, planes: int, blocks: int, stride: int, norm: NormFactory) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes, stride), norm(planes))
        layers = [BasicBlockV1(self.inplanes, planes, stride, downsample, norm)]
        self.inplanes = planes
        layers += [BasicBlockV1(planes, planes, 1, None, norm) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_features(self, x: Tensor) -> Tensor:
        """The feature map before pooling, (N, 64, H/4, W/4) rounded up."""
        x = norm_relu(self.sn1, self.relu, self.conv1(x))
        return self.layer3(self.layer2(self.layer1(x)))


def _register_all() -> None:
    for depth in DEPTHS:
        for norm in ("sn", "bn", "gn"):
            register_architecture(f"resnet{depth}_{norm}", depth, 1, norm, ResNetCifar)


_register_all()
