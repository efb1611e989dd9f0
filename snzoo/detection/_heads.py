"""The SN layers, RoI pools and heads the original SN detection configs put on top of the backbone."""

from __future__ import annotations

import functools
from typing import Callable

from torch import nn
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads
from torchvision.ops import MultiScaleRoIAlign

from snzoo.errors import ModelConfigError
from snzoo.nn import SwitchNorm2d

# The detection release's SwitchNorm default momentum (weight of the old running value).
HEAD_MOMENTUM = 0.997
FPN_CHANNELS = 256
REPRESENTATION_SIZE = 1024
BOX_HEADS = ("auto", "2mlp", "4conv1fc")
_LEVELS = ["0", "1", "2", "3"]


def sn_norm_layer(using_bn: bool) -> Callable[[int], nn.Module]:
    """The norm_layer factory of the FPN and the heads: SwitchNorm2d(C, using_bn=using_bn, momentum=0.997)."""
    return functools.partial(SwitchNorm2d, using_bn=using_bn, momentum=HEAD_MOMENTUM)


def resolve_box_head(box_head: str, with_masks: bool, using_bn: bool) -> str:
    """ "2mlp" or "4conv1fc"; "auto" is "4conv1fc" for Mask R-CNN and for SN without BN (the (8,1) configs),
    "2mlp" otherwise (the (8,2) Faster R-CNN FPN config)."""
    if box_head not in BOX_HEADS:
        raise ModelConfigError(f"box_head must be one of {', '.join(BOX_HEADS)}, got {box_head!r}")
    if box_head != "auto":
        return box_head
    return "4conv1fc" if with_masks or not using_bn else "2mlp"


def box_roi_pool() -> MultiScaleRoIAlign:
    """RoIAlign 7x7 with sampling ratio 2 over the four FPN levels."""
    return MultiScaleRoIAlign(_LEVELS, output_size=7, sampling_ratio=2)


def box_head_module(kind: str, using_bn: bool) -> nn.Module:
    """The box head: "2mlp" = two fc layers of 1024 without norm (roi_2mlp_head); "4conv1fc" = four 3x3 convs of
    256 each followed by SN and ReLU, then one fc of 1024 (roi_Xconv1fc_sn_head)."""
    if kind == "2mlp":
        return TwoMLPHead(FPN_CHANNELS * 7 * 7, REPRESENTATION_SIZE)
    return FastRCNNConvFCHead((FPN_CHANNELS, 7, 7), [FPN_CHANNELS] * 4, [REPRESENTATION_SIZE],
                              norm_layer=sn_norm_layer(using_bn))


def mask_roi_pool() -> MultiScaleRoIAlign:
    """RoIAlign 14x14 with sampling ratio 2 over the four FPN levels."""
    return MultiScaleRoIAlign(_LEVELS, output_size=14, sampling_ratio=2)


def mask_head_module(using_bn: bool) -> nn.Module:
    """Four 3x3 convs of 256 each followed by SN and ReLU (mask_rcnn_fcn_head_v1up4convs_sn); torchvision's
    MaskRCNNPredictor then upsamples 14x14 to the 28x28 masks."""
    return MaskRCNNHeads(FPN_CHANNELS, [FPN_CHANNELS] * 4, 1, norm_layer=sn_norm_layer(using_bn))
