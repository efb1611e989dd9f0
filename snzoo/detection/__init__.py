"""torchvision's Faster / Mask R-CNN with Switchable Normalization in the backbone, the FPN and the heads.

    from snzoo.detection import maskrcnn_resnet50_fpn_sn
    model = maskrcnn_resnet50_fpn_sn(num_classes=91)      # SN (8,1) backbone, SN FPN, SN box and mask heads

The builders mirror the SN detection release's configs (switchablenorms/SwitchNorm_Detection): SN on the FPN's
own layers and in the conv heads, RoIAlign 7 / 14 with sampling ratio 2, 28x28 masks, stem and layer1 frozen,
short side 800. `model.backbone` is an `SNResNetFPN`: `.body` is the snzoo trunk (the classifier's keys conv1,
sn1, layer1..layer4) and `.fpn` torchvision's FeaturePyramidNetwork with SN.

Statistics: the BN term of SN layers takes batch statistics of what the layer sees. Ghost batches (emulating
per-device statistics on one process) apply to `model.backbone` only, whose batches are images; the RoI heads
normalise over the RoIs of all the process's images, not per ghost batch.
"""

from snzoo.detection.backbone import SNResNetFPN, sn_resnet_fpn_backbone
from snzoo.detection.models import (
    DETECTION_MODELS,
    fasterrcnn_resnet50_fpn_sn,
    fasterrcnn_resnet_fpn_sn,
    maskrcnn_resnet50_fpn_sn,
    maskrcnn_resnet_fpn_sn,
)

__all__ = [
    "DETECTION_MODELS", "SNResNetFPN", "fasterrcnn_resnet50_fpn_sn", "fasterrcnn_resnet_fpn_sn",
    "maskrcnn_resnet50_fpn_sn", "maskrcnn_resnet_fpn_sn", "sn_resnet_fpn_backbone",
]
