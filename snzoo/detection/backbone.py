"""An SN ResNet with an SN feature pyramid: the backbone torchvision's Faster / Mask R-CNN take."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Optional, Union

from torch import Tensor, nn
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

from snzoo.detection._heads import FPN_CHANNELS, sn_norm_layer
from snzoo._task_trunk import build_trunk, check_trainable_layers, freeze_stages
from snzoo.nn import switchnorm_layers


class SNResNetFPN(nn.Module):
    """body (the snzoo FeatureListNet trunk, stages 1-4) followed by fpn; forward returns torchvision's
    OrderedDict '0', '1', '2', '3' (reductions 4..32) and 'pool' (max-pooled '3'), each with 256 channels."""

    def __init__(self, body: nn.Module, using_bn: bool) -> None:
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(body.feature_info.channels(), FPN_CHANNELS, LastLevelMaxPool(),
                                         norm_layer=sn_norm_layer(using_bn))
        self.out_channels = FPN_CHANNELS
        self.using_bn = using_bn

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        maps = self.body(x)
        return self.fpn(OrderedDict((str(i), m) for i, m in enumerate(maps)))


def sn_resnet_fpn_backbone(
    backbone: str,
    pretrained_backbone: bool = True,
    trainable_layers: int = 3,
    using_bn: Optional[bool] = None,
    backbone_checkpoint: Optional[Union[str, Path]] = None,
) -> SNResNetFPN:
    """An SN ResNet (zoo entry or architecture) with an FPN whose inner and output convs are followed by SN.

    pretrained_backbone loads the entry's weights (an architecture: its default entry); backbone_checkpoint
    loads a checkpoint file instead; otherwise random init with the entry's norm arguments. The trunk's SN layers
    keep moving averages at momentum 0.997 while fine-tuning, as the detection release did. using_bn None keeps
    the backbone's own; False drops the BN term of the backbone too (SN without BN everywhere, the (8,1)
    configs). All but the last trainable_layers stages (0..5; 3 = layer2..layer4 train) are frozen.
    """
    check_trainable_layers(trainable_layers)
    trunk = build_trunk(backbone, pretrained_backbone, using_bn, backbone_checkpoint, task="detection")
    has_bn = any(layer.using_bn for layer in switchnorm_layers(trunk))
    freeze_stages(trunk, trainable_layers)
    return SNResNetFPN(trunk, has_bn)
