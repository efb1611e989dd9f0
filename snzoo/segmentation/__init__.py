"""Semantic segmentation with SN: torchvision's DeepLabV3 on dilated SN ResNet backbones, with SN in the heads.

    from snzoo.segmentation import deeplabv3_resnet50_sn
    model = deeplabv3_resnet50_sn(num_classes=21, backbone="resnet50v1_sn", output_stride=8)
"""

from snzoo.segmentation._backbone import DeepLabBackbone
from snzoo.segmentation.deeplabv3 import (
    SEGMENTATION_MODELS,
    deeplabv3_resnet101_sn,
    deeplabv3_resnet50_sn,
    deeplabv3_resnet_sn,
)

__all__ = [
    "SEGMENTATION_MODELS", "DeepLabBackbone", "deeplabv3_resnet101_sn", "deeplabv3_resnet50_sn", "deeplabv3_resnet_sn",
]
