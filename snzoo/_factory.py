"""create_model: from a name (architecture, zoo entry or model folder) to a ready model, through the builder."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

from torch import nn

from snzoo.errors import CheckpointError
from snzoo.models import build_model, get_architecture
from snzoo.weights import MODEL_FOLDER_PREFIXES, fetch_weights, read_state_dict
from snzoo.zoo import get_entry

def create_model(
    name: str,
    pretrained: bool = False,
    num_classes: Optional[int] = None,
    checkpoint_path: Optional[Union[str, Path]] = None,
    features_only: bool = False,
    out_indices: Optional[Union[int, Sequence[int]]] = None,
    **overrides,
) -> nn.Module:
    """Build an architecture or zoo entry, optionally with weights.

    name: an architecture (`resnet50v1_sn`) or a zoo entry (`resnet50v1_sn.in1k_8x32_cos120`); with
    pretrained=True a bare architecture means its default entry. An entry's norm arguments and class count
    are used unless overridden (`num_classes`, `using_bn`, `momentum`, `drop_rate`, `in_chans`, ...).
    checkpoint_path: an original checkpoint, a bare state dict or safetensors, read without running pickled
    code. When num_classes differs from the weights', the classifier is re-initialised and the rest loaded.

    Two name prefixes build a model from a Hugging Face model folder (config.json + model.safetensors, as
    `snzoo.hub.export_hf` writes): `hf-hub:ORG/REPO[@REVISION]` fetches it from the Hub through the
    huggingface_hub cache (cache only when SNZOO_OFFLINE / HF_HUB_OFFLINE is set), `local-dir:PATH` reads it
    from disk. Their weights come with them, so checkpoint_path is refused for those names.

    Backbones: features_only=True returns the trunk, whose forward gives the feature maps of the stages in
    out_indices (0 the stem, then the residual stages; None: all) and whose `feature_info` gives their channels
    and reductions; `output_stride=16` or `8` dilates the last stages of the ImageNet ResNets; `in_chans=N`
    adapts the weights' first convolution to N input channels.
    """
    features = {"features_only": features_only, "out_indices": out_indices}
    if name.startswith(MODEL_FOLDER_PREFIXES):
        return _from_folder(name, pretrained, num_classes, checkpoint_path, overrides, features)
    entry = get_entry(name) if "." in name or pretrained else None
    architecture = entry.architecture if entry is not None else get_architecture(name).name
    kwargs = {**(entry.model_kwargs() if entry is not None else {}), **overrides}
    if checkpoint_path is not None:
        state_dict, source = read_state_dict(checkpoint_path), str(checkpoint_path)
    elif pretrained:
        state_dict, source = read_state_dict(fetch_weights(entry)), f"weights of {entry.name}"
    else:
        state_dict, source = None, ""
    return build_model(architecture, kwargs, state_dict=state_dict, source=source, num_classes=num_classes,
                       pretrained_cfg=entry.to_dict() if entry is not None else None, **features)


def _from_folder(
    name: str, pretrained: bool, num_classes: Optional[int], checkpoint_path, overrides, features: dict
) -> nn.Module:
    # Imported here: only these names need the Hub client and the folder logic.
    from snzoo import hub
    from snzoo.hub.config import model_kwargs, pretrained_cfg

    prefix, _, location = name.partition(":")
    if checkpoint_path is not None:
        raise CheckpointError(
            f"checkpoint_path cannot be combined with {name!r}: a {prefix}: model brings its own weights "
            f"({hub.WEIGHTS_NAME})"
        )
    find = hub.hub_folder if prefix == "hf-hub" else hub.local_folder
    folder = find(location, pretrained=pretrained)
    state_dict = read_state_dict(folder.weights) if folder.weights is not None else None
    return build_model(folder.config["architecture"], {**model_kwargs(folder.config), **overrides},
                       state_dict=state_dict, source=f"{folder.where}/{hub.WEIGHTS_NAME}", num_classes=num_classes,
                       pretrained_cfg=pretrained_cfg(folder.config, folder.where), **features)
