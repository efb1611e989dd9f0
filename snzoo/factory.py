"""create_model: from a name (architecture or zoo entry) to a ready model."""

from __future__ import annotations

from typing import Optional, Union
from pathlib import Path

from torch import nn

from snzoo import zoo
from snzoo.checkpoint import CLASSIFIER_PREFIX, load_checked, read_state_dict
from snzoo.models import get_architecture
from snzoo.weights import load_entry_state_dict


def create_model(
    name: str,
    pretrained: bool = False,
    num_classes: Optional[int] = None,
    checkpoint_path: Optional[Union[str, Path]] = None,
    **overrides,
) -> nn.Module:
    """Build an architecture or zoo entry, optionally with weights.

    name: an architecture (`resnet50v1_sn`) or a zoo entry (`resnet50v1_sn.in1k_8x32_cos120`); with
    pretrained=True a bare architecture means its default entry. An entry's norm arguments and class count
    are used unless overridden (`num_classes`, `using_bn`, `momentum`, `drop_rate`, `in_chans`, ...).
    checkpoint_path: an original checkpoint, a bare state dict or safetensors, read without running pickled
    code. When num_classes differs from the weights', the classifier is re-initialised and the rest loaded.

    Two name prefixes build a model from a Hugging Face model folder (config.json + model.safetensors, as
    `snzoo.hf.export_hf` writes): `hf-hub:ORG/REPO[@REVISION]` fetches it from the Hub through the
    huggingface_hub cache (cache only when SNZOO_OFFLINE / HF_HUB_OFFLINE is set), `local-dir:PATH` reads it
    from disk. Their weights come with them, so checkpoint_path is refused for those names.
    """
    if name.startswith(("hf-hub:", "local-dir:")):
        # Imported here: only these names need the Hub client and the folder logic.
        from snzoo import hf
        from snzoo.errors import CheckpointError

        prefix, _, location = name.partition(":")
        if checkpoint_path is not None:
            raise CheckpointError(
                f"checkpoint_path cannot be combined with {name!r}: a {prefix}: model brings its own weights "
                f"({hf.WEIGHTS_NAME})"
            )
        build = hf.model_from_hf_hub if prefix == "hf-hub" else hf.model_from_folder
        return build(location, pretrained=pretrained, num_classes=num_classes, **overrides)
    entry = None
    if "." in name or pretrained:
        entry = zoo.get_entry(name)
        spec = get_architecture(entry.architecture)
    else:
        spec = get_architecture(name)
    kwargs = entry.model_kwargs() if entry is not None else {}
    kwargs.update(overrides)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    model = spec.build(**kwargs)
    model.architecture = spec.name
    model.pretrained_cfg = entry.to_dict() if entry is not None else {"architecture": spec.name}

    if checkpoint_path is not None:
        state_dict, source = read_state_dict(checkpoint_path), str(checkpoint_path)
    elif pretrained:
        state_dict, source = load_entry_state_dict(entry), f"weights of {entry.name}"
    else:
        return model
    weights_classes = state_dict.get(CLASSIFIER_PREFIX + "weight")
    reset_head = (
        num_classes is not None and weights_classes is not None and weights_classes.shape[0] != num_classes
    )
    load_checked(model, state_dict, source=source, skip_classifier=reset_head)
    return model
