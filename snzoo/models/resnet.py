"""ResNet v1 and v2 (pre-activation) with a pluggable norm, with the module names of the original SN release.

Every norm slot is named sn1, sn2, sn3 (and sn_out in v2) whatever the norm, so state_dict keys of SN models
are exactly the original checkpoints' and the BN / GN baselines line up with them key for key.
"""

from __future__ import annotations

import functools
from typing import Optional

from torch import Tensor, nn

from snzoo.models.classifier import PooledClassifier
from snzoo.models.norms import NormFactory
from snzoo.models.registry import register_architecture
from snzoo.nn import norm_relu

LAYERS = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3], 152: [3, 8, 36, 3]}


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation, dilation=dilation,
                     bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlockV1(nn.Module):
    """Two 3x3 convolutions; in a dilated stage the first block's first one keeps the previous dilation."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int, downsample: Optional[nn.Module], norm: NormFactory,
                 dilation: int = 1, first_dilation: Optional[int] = None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride, first_dilation or dilation)
        self.sn1 = norm(planes)
        self.conv2 = conv3x3(planes, planes, dilation=dilation)
        self.sn2 = norm(planes, last=True)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = norm_relu(self.sn1, self.relu, self.conv1(x))
        return norm_relu(self.sn2, self.relu, self.conv2(out), shortcut)


class BottleneckV1(nn.Module):
    """Bottleneck with the stride on the 3x3 conv (torchvision's "v1.5" placement, as the SN release)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, downsample: Optional[nn.Module], norm: NormFactory,
                 dilation: int = 1, first_dilation: Optional[int] = None):
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.sn1 = norm(planes)
        self.conv2 = conv3x3(planes, planes, stride, first_dilation or dilation)
        self.sn2 = norm(planes)
        self.conv3 = conv1x1(planes, planes * 4)
        self.sn3 = norm(planes * 4, last=True)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = norm_relu(self.sn1, self.relu, self.conv1(x))
        out = norm_relu(self.sn2, self.relu, self.conv2(out))
        return norm_relu(self.sn3, self.relu, self.conv3(out), shortcut)


class BasicBlockV2(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int, downsample: Optional[nn.Module], norm: NormFactory,
                 dilation: int = 1, first_dilation: Optional[int] = None):
        super().__init__()
        self.sn1 = norm(inplanes)
        self.conv1 = conv3x3(inplanes, planes, stride, first_dilation or dilation)
        self.sn2 = norm(planes)
        self.conv2 = conv3x3(planes, planes, dilation=dilation)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        preact = norm_relu(self.sn1, self.relu, x)
        shortcut = x if self.downsample is None else self.downsample(preact)
        out = self.conv1(preact)
        out = self.conv2(norm_relu(self.sn2, self.relu, out))
        return out + shortcut


class BottleneckV2(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, downsample: Optional[nn.Module], norm: NormFactory,
                 dilation: int = 1, first_dilation: Optional[int] = None):
        super().__init__()
        self.sn1 = norm(inplanes)
        self.conv1 = conv1x1(inplanes, planes)
        self.sn2 = norm(planes)
        self.conv2 = conv3x3(planes, planes, stride, first_dilation or dilation)
        self.sn3 = norm(planes)
        self.conv3 = conv1x1(planes, planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        preact = norm_relu(self.sn1, self.relu, x)
        shortcut = x if self.downsample is None else self.downsample(preact)
        out = self.conv1(preact)
        out = self.conv2(norm_relu(self.sn2, self.relu, out))
        out = self.conv3(norm_relu(self.sn3, self.relu, out))
        return out + shortcut


class ResNet(PooledClassifier):
    """ResNet v1 or v2 (pre-activation) with SN, SSN, BN or GN, keyed as the original SN checkpoints.

    Stem conv 7x7/2, norm, ReLU, max-pool; four stages; (v2: sn_out + ReLU); adaptive average pooling (so any
    input of at least 32x32 works), dropout, fc. momentum follows the SN convention (weight of the old value)
    for every norm; last_gamma zero-initialises the last norm of each block (default: on for v1, off for v2).

    output_stride 16 or 8 replaces the stride of layer4 (16), or of layer3 and layer4 (8), by dilation, as
    torchvision's replace_stride_with_dilation: the same keys and shapes, so the same weights load.
    Stages for features: 0 the stem after its ReLU (before the max-pool), 1-4 layer1..layer4; for v2 the
    pre-activation sums of layer1..layer3, and for stage 4 layer4 followed by sn_out and the ReLU (as timm's
    pre-activation ResNets), the map the head pools.
    """

    def __init__(
        self,
        depth: int = 50,
        norm: str = "sn",
        version: int = 1,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float = 0.5,
        using_bn: bool = True,
        using_moving_average: bool = True,
        momentum: Optional[float] = None,
        eps: float = 1e-5,
        last_gamma: Optional[bool] = None,
        gn_groups: int = 32,
        output_stride: int = 32,
    ) -> None:
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        if depth not in LAYERS:
            raise ValueError(f"depth must be one of {sorted(LAYERS)}, got {depth}")
        if version not in (1, 2):
            raise ValueError(f"version must be 1 or 2, got {version}")
        if last_gamma is None:
            last_gamma = version == 1
        factory = NormFactory(norm, using_bn, using_moving_average, momentum, eps, last_gamma, gn_groups)
        self.norm_config = factory.config()
        basic = depth < 50
        block = {(1, True): BasicBlockV1, (1, False): BottleneckV1, (2, True): BasicBlockV2, (2, False): BottleneckV2}[
            (version, basic)
        ]
        self.depth, self.version, self.norm = depth, version, norm
        self.inplanes, self.dilation = 64, 1
        self.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.sn1 = factory(64)
        self.relu = nn.ReLU(inplace=True)
        # The SSN release pools without padding and with ceil_mode; it changes nothing for 224 inputs' keys.
        if norm == "ssn":
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=0, ceil_mode=True)
        else:
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        widths = (64, 128, 256, 512)
        # Stages 3 and 4 (reductions 16, 32) dilate instead of striding once the output stride is reached.
        dilate = (False, False, output_stride == 8, output_stride in (8, 16))
        for index, (width, blocks) in enumerate(zip(widths, LAYERS[depth])):
            stride = 1 if index == 0 else 2
            layer = self._make_layer(block, width, blocks, stride, factory, dilate[index])
            setattr(self, f"layer{index + 1}", layer)
        if version == 2:
            self.sn_out = factory(512 * block.expansion)
        self._make_head(512 * block.expansion, num_classes, drop_rate)
        self._init_convs()
        self.output_stride = output_stride
        last = ("layer4", "sn_out", "relu") if version == 2 else ("layer4",)
        reductions = [2, 4, 8, min(16, output_stride), output_stride]
        self._set_stages(
            [("conv1", "sn1", "relu"), ("maxpool", "layer1"), ("layer2",), ("layer3",), last],
            [{"num_chs": c, "reduction": r, "module": m} for c, r, m in zip(
                [64] + [w * block.expansion for w in widths], reductions,
                ["relu", "layer1", "layer2", "layer3", "sn_out" if version == 2 else "layer4"])],
        )

    def _make_layer(
        self, block, planes: int, blocks: int, stride: int, norm: NormFactory, dilate: bool = False
    ) -> nn.Sequential:
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            conv = conv1x1(self.inplanes, planes * block.expansion, stride)
            # v2 shortcuts project the pre-activation with a bare conv; v1 adds a norm after it.
            downsample = conv if self.version == 2 else nn.Sequential(conv, norm(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample, norm, self.dilation, previous_dilation)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, 1, None, norm, self.dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_features(self, x: Tensor) -> Tensor:
        """The feature map before pooling, (N, num_features, H/s, W/s) for output stride s (32 by default)."""
        x = self.maxpool(norm_relu(self.sn1, self.relu, self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        if self.version == 2:
            x = norm_relu(self.sn_out, self.relu, x)
        return x


def _register_all() -> None:
    for depth in LAYERS:
        for version in (1, 2):
            for norm in ("sn", "bn", "gn"):
                builder = functools.partial(ResNet, version=version)
                register_architecture(f"resnet{depth}v{version}_{norm}", depth, version, norm, builder)
    register_architecture("resnet50v1_ssn", 50, 1, "ssn", functools.partial(ResNet, version=1))


_register_all()
