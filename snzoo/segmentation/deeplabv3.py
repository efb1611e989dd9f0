"""DeepLabV3 with Switchable Normalization: torchvision's model on a dilated SN ResNet, with SN in the heads.

What mirrors the original: the SN paper (arXiv:1806.10779) reports semantic segmentation with SN in a dilated
DeepLab ResNet-50, where the small per-device batches of dense prediction are SN's case. No segmentation code or
checkpoints were released, so the network is torchvision's DeepLabV3 (ASPP head, FCN auxiliary head) with every
BatchNorm an SN layer, on the zoo's ImageNet SN ResNets; the SN layers are the released layer, exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Union

from torchvision.models.segmentation import DeepLabV3

from snzoo.errors import ModelConfigError
from snzoo.nn import switchnorm_layers
from snzoo._task_trunk import check_backbone_depth, check_trainable_layers, freeze_stages
from snzoo.segmentation._backbone import DeepLabBackbone, build_trunk, check_output_stride
from snzoo.segmentation._heads import sn_deeplab_head, sn_fcn_head


def deeplabv3_resnet_sn(
    num_classes: int = 21,
    backbone: str = "resnet50v1_sn",
    pretrained_backbone: bool = True,
    output_stride: int = 8,
    using_bn: Optional[bool] = None,
    trainable_layers: int = 5,
    aux_loss: bool = False,
    backbone_checkpoint: Optional[Union[str, Path]] = None,
) -> DeepLabV3:
    """torchvision's DeepLabV3 on any ImageNet SN ResNet (v1 / v2, 18..152, or resnet50v1_ssn), SN in the heads.

    backbone: a zoo entry (`resnet50v1_sn.in1k_8x32_cos120`) or an architecture (its default entry when it has
    one). pretrained_backbone loads the entry's ImageNet weights through snzoo's checked fetch; False builds the
    entry's architecture and norm arguments with random init; backbone_checkpoint loads a classification
    checkpoint file (any class count; original, bare state dict or safetensors) into the architecture instead.
    output_stride 8 dilates layer3 and layer4, 16 only layer4 (same weights either way); the ASPP rates follow it:
    (12, 24, 36) at 8, (6, 12, 18) at 16. The model maps (N, 3, H, W) to {"out": (N, num_classes, H, W)}, plus
    "aux" from layer3 through an FCN head when aux_loss.

    Normalization: the heads' SN layers are SwitchNorm2d(C, using_bn, momentum=0.997) with moving averages; the
    backbone's SN layers fine-tune with moving averages at momentum 0.997 too (the weights and running statistics
    load unchanged). using_bn None follows the backbone (SN without BN for the (8,1) entries); False also drops the
    backbone's BN term (`snzoo.nn.drop_bn_branch`), for one image per device; True needs a backbone with one.
    trainable_layers (0..5, torchvision's count from layer4 down, the stem = conv1 + sn1 being the fifth): the
    other stages are frozen, their parameters without gradients and their SN layers `freeze_switchnorm`-ed.

    State-dict keys: `backbone.` + the classifier's keys without `fc.` (`backbone.conv1.weight`,
    `backbone.layer1.0.sn1.mean_weight`, ...), then torchvision's `classifier.*` and `aux_classifier.*`. The model
    records `output_stride` and `using_bn` (its heads').
    Bad arguments raise snzoo.errors.ModelConfigError (UnknownModelError for unknown names).
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ModelConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
    check_output_stride(output_stride)
    check_trainable_layers(trainable_layers)
    trunk = build_trunk(backbone, pretrained_backbone, output_stride, using_bn, backbone_checkpoint)
    head_bn = any(layer.using_bn for layer in switchnorm_layers(trunk)) if using_bn is None else using_bn
    freeze_stages(trunk, trainable_layers)
    body = DeepLabBackbone(trunk)
    aux_channels, out_channels = body.feature_info.channels()
    classifier = sn_deeplab_head(out_channels, num_classes, output_stride, head_bn)
    aux_classifier = sn_fcn_head(aux_channels, num_classes, head_bn) if aux_loss else None
    model = DeepLabV3(body, classifier, aux_classifier)
    model.output_stride = output_stride
    model.using_bn = head_bn
    return model


def deeplabv3_resnet50_sn(
    num_classes: int = 21,
    backbone: str = "resnet50v1_sn",
    pretrained_backbone: bool = True,
    output_stride: int = 8,
    using_bn: Optional[bool] = None,
    trainable_layers: int = 5,
    aux_loss: bool = False,
    backbone_checkpoint: Optional[Union[str, Path]] = None,
) -> DeepLabV3:
    """DeepLabV3 on an SN ResNet-50 (v1, v2 or SSN; the default entry of resnet50v1_sn unless `backbone` names
    another), output stride 8 and the (12, 24, 36) ASPP by default, as torchvision's deeplabv3_resnet50. The
    arguments are deeplabv3_resnet_sn's; a backbone of another depth is an error."""
    check_backbone_depth("deeplabv3_resnet50_sn", backbone, 50, "segmentation", "deeplabv3_resnet_sn")
    return deeplabv3_resnet_sn(num_classes, backbone, pretrained_backbone, output_stride, using_bn,
                               trainable_layers, aux_loss, backbone_checkpoint)


def deeplabv3_resnet101_sn(
    num_classes: int = 21,
    backbone: str = "resnet101v1_sn",
    pretrained_backbone: bool = True,
    output_stride: int = 8,
    using_bn: Optional[bool] = None,
    trainable_layers: int = 5,
    aux_loss: bool = False,
    backbone_checkpoint: Optional[Union[str, Path]] = None,
) -> DeepLabV3:
    """DeepLabV3 on an SN ResNet-101 (v1 or v2; the default entry of resnet101v1_sn unless `backbone` names
    another). The arguments are deeplabv3_resnet_sn's; a backbone of another depth is an error."""
    check_backbone_depth("deeplabv3_resnet101_sn", backbone, 101, "segmentation", "deeplabv3_resnet_sn")
    return deeplabv3_resnet_sn(num_classes, backbone, pretrained_backbone, output_stride, using_bn,
                               trainable_layers, aux_loss, backbone_checkpoint)


SEGMENTATION_MODELS: dict[str, Callable[..., DeepLabV3]] = {
    "deeplabv3_resnet50_sn": deeplabv3_resnet50_sn,
    "deeplabv3_resnet101_sn": deeplabv3_resnet101_sn,
    "deeplabv3_resnet_sn": deeplabv3_resnet_sn,
}
