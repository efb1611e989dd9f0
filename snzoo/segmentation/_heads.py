"""torchvision's DeepLabV3 head (ASPP) and FCN auxiliary head with SN wherever torchvision puts BatchNorm."""

from __future__ import annotations

from torch import nn
from torchvision.models.segmentation.deeplabv3 import DeepLabHead
from torchvision.models.segmentation.fcn import FCNHead

from snzoo.nn import SwitchNorm2d

# The original's 2018 default (weight of the old running value), as the backbone keeps while fine-tuning.
HEAD_MOMENTUM = 0.997
# The DeepLabV3 paper's ASPP rates: 6, 12, 18 at output stride 16 and twice that at 8 (torchvision's default).
ATROUS_RATES = {8: (12, 24, 36), 16: (6, 12, 18)}


def _switch_norms(head: nn.Module, using_bn: bool) -> nn.Module:
    """Replace every BatchNorm2d of `head` by a fresh SwitchNorm2d(C, using_bn, momentum 0.997), in place."""
    for parent in list(head.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                setattr(parent, name, SwitchNorm2d(child.num_features, using_bn=using_bn, momentum=HEAD_MOMENTUM))
    return head


def sn_deeplab_head(in_channels: int, num_classes: int, output_stride: int, using_bn: bool) -> DeepLabHead:
    """torchvision's DeepLabHead with SN: ASPP (1x1; three 3x3 atrous branches at the output stride's rates; image
    pooling AdaptiveAvgPool2d(1) -> 1x1 -> SN -> ReLU -> upsampling; projection 1x1 -> SN -> ReLU -> Dropout(0.5)),
    then 3x3 conv to 256 -> SN -> ReLU -> 1x1 conv to num_classes. Module names are torchvision's.

    The pooling branch's SN sees 1x1 maps: its IN variance over one value is defined as 0 (snzoo's L == 1 rule), so
    it trains at any batch size, one image included, where BatchNorm there needs two.
    """
    return _switch_norms(DeepLabHead(in_channels, num_classes, ATROUS_RATES[output_stride]), using_bn)


def sn_fcn_head(in_channels: int, num_classes: int, using_bn: bool) -> FCNHead:
    """torchvision's FCNHead with SN: 3x3 conv to in_channels / 4 -> SN -> ReLU -> Dropout(0.1) -> 1x1 conv."""
    return _switch_norms(FCNHead(in_channels, num_classes), using_bn)
