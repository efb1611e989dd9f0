"""Faster and Mask R-CNN builders with SN in the backbone, the FPN and the heads, as the SN detection configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Union

from torchvision.models.detection import FasterRCNN, MaskRCNN

from snzoo.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from snzoo.detection import _heads
from snzoo._task_trunk import check_backbone_depth
from snzoo.detection.backbone import SNResNetFPN, sn_resnet_fpn_backbone

FASTER_BACKBONE = "resnet50v1_sn.in1k_8x2_detectron"
MASK_BACKBONE = "resnet50v1_sn.in1k_8x1_detectron"
CheckpointPath = Optional[Union[str, Path]]


def _defaults(backbone: SNResNetFPN) -> dict[str, Any]:
    """torchvision's arguments the SN configs fix: short side 800 (max 1333), the backbone's eval mean / std."""
    evaluation = backbone.body.pretrained_cfg.get("eval") or {}
    return {"min_size": 800, "max_size": 1333, "image_mean": list(evaluation.get("mean", IMAGENET_MEAN)),
            "image_std": list(evaluation.get("std", IMAGENET_STD))}


def _build(with_masks: bool, num_classes: int, backbone: str, pretrained_backbone: bool, trainable_layers: int,
           using_bn: Optional[bool], box_head: str, backbone_checkpoint: CheckpointPath, kwargs: dict):
    _heads.resolve_box_head(box_head, with_masks, True)  # bad names fail before a backbone is built
    fpn = sn_resnet_fpn_backbone(backbone, pretrained_backbone, trainable_layers, using_bn, backbone_checkpoint)
    head = _heads.resolve_box_head(box_head, with_masks, fpn.using_bn)
    options = {**_defaults(fpn), "box_roi_pool": _heads.box_roi_pool(),
               "box_head": _heads.box_head_module(head, fpn.using_bn)}
    if with_masks:
        options.update(mask_roi_pool=_heads.mask_roi_pool(), mask_head=_heads.mask_head_module(fpn.using_bn))
    options.update(kwargs)
    model = (MaskRCNN if with_masks else FasterRCNN)(fpn, num_classes=num_classes, **options)
    model.box_head_kind = head
    return model


def fasterrcnn_resnet_fpn_sn(
    num_classes: int = 91,
    backbone: str = FASTER_BACKBONE,
    pretrained_backbone: bool = True,
    trainable_layers: int = 3,
    using_bn: Optional[bool] = None,
    box_head: str = "auto",
    backbone_checkpoint: CheckpointPath = None,
    **kwargs,
) -> FasterRCNN:
    """torchvision's FasterRCNN on any SN ResNet (v1 / v2, depth 18..152, resnet50v1_ssn) with an SN FPN.

    Mirrors the SN detection configs: SN after the FPN's inner and output convs (FPN.USE_SN) at momentum 0.997;
    box RoIAlign 7x7, sampling ratio 2; box head "2mlp" (two fc of 1024, no norm: roi_2mlp_head of the (8,2)
    config) or "4conv1fc" (four 3x3 convs + SN, one fc of 1024: roi_Xconv1fc_sn_head of the (8,1) configs),
    "auto" choosing the latter when the model has no BN term (using_bn False); stem and layer1 frozen by default
    (trainable_layers=3, FREEZE_AT 2); short side 800, long side at most 1333; the backbone entry's mean / std.
    using_bn None keeps the backbone's own; False makes every SN layer, backbone included, SN without BN.
    Every other torchvision argument passes through kwargs (min_size, rpn_*, box_*...).
    """
    return _build(False, num_classes, backbone, pretrained_backbone, trainable_layers, using_bn, box_head,
                  backbone_checkpoint, kwargs)


def maskrcnn_resnet_fpn_sn(
    num_classes: int = 91,
    backbone: str = MASK_BACKBONE,
    pretrained_backbone: bool = True,
    trainable_layers: int = 3,
    using_bn: Optional[bool] = None,
    box_head: str = "auto",
    backbone_checkpoint: CheckpointPath = None,
    **kwargs,
) -> MaskRCNN:
    """torchvision's MaskRCNN on any SN ResNet with an SN FPN and SN heads.

    Mirrors the SN Mask R-CNN config: the FPN and box head of fasterrcnn_resnet_fpn_sn, box head "4conv1fc"
    under "auto" (roi_Xconv1fc_sn_head); mask RoIAlign 14x14, sampling ratio 2; mask head of four 3x3 convs of
    256 + SN (mask_rcnn_fcn_head_v1up4convs_sn) and torchvision's predictor, 28x28 masks. With the default
    (8,1) backbone every SN layer is SN without BN, as that config.
    """
    return _build(True, num_classes, backbone, pretrained_backbone, trainable_layers, using_bn, box_head,
                  backbone_checkpoint, kwargs)


def fasterrcnn_resnet50_fpn_sn(
    num_classes: int = 91,
    backbone: str = FASTER_BACKBONE,
    pretrained_backbone: bool = True,
    trainable_layers: int = 3,
    using_bn: Optional[bool] = None,
    box_head: str = "auto",
    backbone_checkpoint: CheckpointPath = None,
    **kwargs,
) -> FasterRCNN:
    """Faster R-CNN R-50-FPN with SN: fasterrcnn_resnet_fpn_sn on a depth-50 backbone.

    The default, the detection release's ResNet50v1+SN(8,2) backbone with the 2-fc box head, is its
    Faster R-CNN R-50-FPN SN (8,2) config (39.10 box AP on COCO, 2x schedule); backbone=
    "resnet50v1_sn.in1k_8x1_detectron" gives the (8,1) config (SN without BN, conv box head; 38.99).
    """
    check_backbone_depth("fasterrcnn_resnet50_fpn_sn", backbone, 50, "detection", "fasterrcnn_resnet_fpn_sn")
    return fasterrcnn_resnet_fpn_sn(num_classes, backbone, pretrained_backbone, trainable_layers, using_bn,
                                    box_head, backbone_checkpoint, **kwargs)


def maskrcnn_resnet50_fpn_sn(
    num_classes: int = 91,
    backbone: str = MASK_BACKBONE,
    pretrained_backbone: bool = True,
    trainable_layers: int = 3,
    using_bn: Optional[bool] = None,
    box_head: str = "auto",
    backbone_checkpoint: CheckpointPath = None,
    **kwargs,
) -> MaskRCNN:
    """Mask R-CNN R-50-FPN with SN: maskrcnn_resnet_fpn_sn on a depth-50 backbone.

    The default, the detection release's ResNet50v1+SN(8,1) backbone (SN without BN everywhere, conv box and
    mask heads with SN), is its Mask R-CNN R-50-FPN SN (8,1) config (41.01 box AP / 36.12 mask AP on COCO).
    """
    check_backbone_depth("maskrcnn_resnet50_fpn_sn", backbone, 50, "detection", "maskrcnn_resnet_fpn_sn")
    return maskrcnn_resnet_fpn_sn(num_classes, backbone, pretrained_backbone, trainable_layers, using_bn,
                                  box_head, backbone_checkpoint, **kwargs)


DETECTION_MODELS: dict[str, Callable[..., Any]] = {
    "fasterrcnn_resnet50_fpn_sn": fasterrcnn_resnet50_fpn_sn,
    "maskrcnn_resnet50_fpn_sn": maskrcnn_resnet50_fpn_sn,
    "fasterrcnn_resnet_fpn_sn": fasterrcnn_resnet_fpn_sn,
    "maskrcnn_resnet_fpn_sn": maskrcnn_resnet_fpn_sn,
}
