"""The dilated SN ResNet trunk of a segmenter (snzoo._task_trunk builds it) and the wrapper that gives torchvision's
DeepLabV3 its dict."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Optional, Union

from torch import Tensor

from snzoo._task_trunk import build_trunk as _build_trunk
from snzoo.errors import ModelConfigError
from snzoo.models import FeatureListNet

OUTPUT_STRIDES = (8, 16)
OUT_INDICES = (3, 4)  # layer3 feeds the auxiliary head, layer4 the ASPP head


class DeepLabBackbone(FeatureListNet):
    """An SN ResNet trunk (stages 3 and 4) whose forward returns torchvision's segmentation dict:
    {"out": layer4's map, "aux": layer3's map}.

    It holds the trunk's modules under their classifier names, so inside DeepLabV3 the keys are
    `backbone.conv1.weight`, `backbone.layer1.0.sn1.mean_weight`, ...: a classification checkpoint's keys with the
    `backbone.` prefix and without `fc.`. `feature_info` describes the two maps.
    """

    def __init__(self, trunk: FeatureListNet) -> None:
        super().__init__(trunk, trunk.out_indices)

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":  # type: ignore[override]
        aux, out = super().forward(x)
        return OrderedDict(out=out, aux=aux)


def check_output_stride(output_stride: int) -> None:
    """Raise ModelConfigError unless output_stride is 8 or 16."""
    if isinstance(output_stride, bool) or output_stride not in OUTPUT_STRIDES:
        raise ModelConfigError(
            f"output_stride must be 8 or 16 for DeepLabV3 (the dilated backbone's reduction), got {output_stride!r}"
        )


def build_trunk(name: str, pretrained: bool, output_stride: int, using_bn: Optional[bool] = None,
                checkpoint: Optional[Union[str, Path]] = None) -> FeatureListNet:
    """The dilated trunk of a segmenter: stages 3 and 4 (the auxiliary and the ASPP head's inputs)."""
    return _build_trunk(name, pretrained, using_bn, checkpoint, out_indices=OUT_INDICES, output_stride=output_stride,
                        task="segmentation")
