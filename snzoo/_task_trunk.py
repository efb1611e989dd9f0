"""The SN ResNet trunk of a task model (detector, segmenter): which backbone a name stands for, building it with its
weights, the BN term dropped where asked, and the frozen stages. Shared by snzoo.detection and snzoo.segmentation."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

from torch import nn

from snzoo._factory import create_model
from snzoo.errors import ModelConfigError
from snzoo.models import ArchitectureSpec, FeatureListNet, ResNet, build_model, get_architecture, infer_model_kwargs
from snzoo.nn import drop_bn_branch, freeze_switchnorm, switchnorm_layers
from snzoo.weights import read_state_dict
from snzoo.zoo import Entry, get_entry, manifest

# Task models fine-tune with moving averages at the detection release's momentum (its TEST.USE_BATCH_AVG is false),
# whatever statistics the backbone was pretrained with: batch-average accumulation would need a finalising pass
# before every evaluation.
TASK_MOMENTUM = 0.997
# torchvision's trainable_layers order: the last stages train first; "stem" = conv1 and sn1.
_TRAINABLE_ORDER = ("layer4", "layer3", "layer2", "layer1", "stem")
# The trunk's top-level modules by the stage they belong to (v2's sn_out normalises layer4's output).
_STAGE_OF = {"conv1": "stem", "sn1": "stem", "relu": "stem", "maxpool": "stem", "sn_out": "layer4"}


def check_trainable_layers(trainable_layers: int) -> None:
    """Raise ModelConfigError unless trainable_layers is an integer from 0 to 5."""
    if isinstance(trainable_layers, bool) or not isinstance(trainable_layers, int) or not 0 <= trainable_layers <= 5:
        raise ModelConfigError(
            f"trainable_layers must be an integer from 0 (whole backbone frozen) to 5 (nothing frozen), got "
            f"{trainable_layers!r}"
        )


def backbone_spec(name: str, task: str = "task model") -> ArchitectureSpec:
    """The architecture of a backbone name (zoo entry or architecture), checked to be a four-stage SN ResNet."""
    architecture = get_entry(name).architecture if "." in name else name
    spec = get_architecture(architecture)
    builder = getattr(spec.builder, "func", spec.builder)
    if builder is not ResNet or spec.norm not in ("sn", "ssn"):
        raise ModelConfigError(
            f"{name!r} cannot be a {task} backbone: it is not an ImageNet SN ResNet with four stages; use one "
            f"of resnet{{18,34,50,101,152}}v{{1,2}}_sn, resnet50v1_ssn or a zoo entry of one "
            f"(snzoo.list_models('resnet*_s*sn', pretrained=True))"
        )
    return spec


def _entry_of(name: str) -> Optional[Entry]:
    # A bare architecture stands for its default entry when it has one, so that random init and pretrained
    # weights give the same norm arguments.
    return get_entry(name) if "." in name else manifest().default_entry(name)


def check_backbone_depth(builder: str, backbone: str, depth: int, task: str, generic: str) -> None:
    """Raise ModelConfigError unless `backbone` is a ResNet of `depth` (the builders named after one depth)."""
    found = backbone_spec(backbone, task).depth
    if found != depth:
        raise ModelConfigError(
            f"{builder} needs a ResNet-{depth} backbone, but {backbone!r} is a ResNet-{found}; pass a depth-{depth} "
            f"entry or architecture, or use {generic} for other depths"
        )


def build_trunk(
    name: str,
    pretrained: bool,
    using_bn: Optional[bool] = None,
    checkpoint: Optional[Union[str, Path]] = None,
    *,
    out_indices: Sequence[int] = (1, 2, 3, 4),
    output_stride: int = 32,
    task: str = "task model",
) -> FeatureListNet:
    """The backbone's FeatureListNet (the stages in out_indices, dilated to output_stride) with its weights: the
    checkpoint's (when given), the entry's (pretrained), or random init with the entry's norm arguments; using_bn
    False drops the BN term of its SN layers, True requires one."""
    spec = backbone_spec(name, task)
    features = {"features_only": True, "out_indices": tuple(out_indices)}
    overrides = {"momentum": TASK_MOMENTUM, "using_moving_average": True, "output_stride": output_stride}
    if checkpoint is not None:
        state_dict = read_state_dict(checkpoint)
        entry = _entry_of(name)
        implied = infer_model_kwargs(state_dict)
        kwargs = {**(entry.model_kwargs() if entry is not None else {}), **overrides, **implied}
        if spec.norm == "sn":
            kwargs["using_bn"] = implied.get("using_bn", True)  # the file's SN layers decide, not the entry's
        trunk = build_model(spec.name, kwargs, state_dict=state_dict, source=str(checkpoint), **features)
    elif pretrained:
        trunk = create_model(get_entry(name).name, pretrained=True, **features, **overrides)
    else:
        entry = _entry_of(name)
        kwargs = {**(entry.model_kwargs() if entry is not None else {}), **overrides}
        if using_bn is not None and spec.norm == "sn":
            kwargs["using_bn"] = using_bn  # random init: built as asked, nothing to drop
        trunk = build_model(spec.name, kwargs, pretrained_cfg=entry.to_dict() if entry is not None else None,
                            **features)
    has_bn = any(layer.using_bn for layer in switchnorm_layers(trunk))
    if using_bn is True and not has_bn:
        raise ModelConfigError(
            f"using_bn=True needs a backbone whose SN layers have a BN term, and the weights of {name!r} have none; "
            f"pass using_bn=None or False, or a backbone trained with using_bn=True"
        )
    if using_bn is False and has_bn:
        if spec.norm == "ssn":
            raise ModelConfigError(
                f"using_bn=False cannot apply to {name!r}: Sparse SN layers keep their BN term; pass using_bn=None "
                f"or an SN backbone"
            )
        drop_bn_branch(trunk)
    return trunk


def freeze_stages(trunk: nn.Module, trainable_layers: int) -> list[str]:
    """Freeze all but the last `trainable_layers` stages (0..5, torchvision's count; 5 = the stem trains too):
    their parameters stop requiring gradients and their SN layers become frozen SN (eval formulation, no buffer
    update, same state-dict keys). Returns the names of the frozen top-level modules."""
    check_trainable_layers(trainable_layers)
    training = set(_TRAINABLE_ORDER[:trainable_layers])
    frozen = []
    for name, module in list(trunk.named_children()):
        if _STAGE_OF.get(name, name) in training:
            continue
        module.requires_grad_(False)
        # freeze_switchnorm returns the frozen layer when handed an SN layer itself (sn1, sn_out).
        setattr(trunk, name, freeze_switchnorm(module))
        frozen.append(name)
    return frozen
