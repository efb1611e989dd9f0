"""The one build path: an architecture and its arguments, plus a state dict checked key by key, to a model.

Every way of making a model ends here: `snzoo.create_model` (names, zoo entries, checkpoint files),
`hf-hub:` / `local-dir:` folders, `snzoo eval --checkpoint`, `snzoo verify`, `snzoo convert` and the weights a
training run exports. A state dict is loaded only after every key and shape matches the architecture, every
floating-point tensor holds a floating dtype and finite values; any difference is one error line.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Optional

import torch
from torch import Tensor, nn

from snzoo.errors import CheckpointError
from snzoo.models._features import FeatureListNet, Indices
from snzoo.models.registry import get_architecture

CLASSIFIER_PREFIX = "fc."


def build_model(
    architecture: str,
    model_kwargs: Optional[Mapping[str, Any]] = None,
    *,
    state_dict: Optional[Mapping[str, Tensor]] = None,
    source: str = "checkpoint",
    num_classes: Optional[int] = None,
    pretrained_cfg: Optional[Mapping[str, Any]] = None,
    features_only: bool = False,
    out_indices: Indices = None,
) -> nn.Module:
    """Build an architecture with its builder arguments and, when given, load a checked state dict.

    num_classes overrides the class count; when it differs from the state dict's, the classifier is
    re-initialised and every other tensor loaded. pretrained_cfg (the zoo entry's, or a model folder's) is
    kept on the model with `architecture`, so a model always says what it is and how it is evaluated.
    When the model's `in_chans` differs from the weights', their first convolution is adapted (adapt_input_conv).
    features_only returns the trunk as a FeatureListNet giving the feature maps of the stages in out_indices
    (None: all), with the same weights loaded as the full model.
    """
    spec = get_architecture(architecture)
    kwargs = dict(model_kwargs or {})
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    model = spec.build(**kwargs)
    model.architecture = spec.name
    model.pretrained_cfg = dict(pretrained_cfg) if pretrained_cfg is not None else {"architecture": spec.name}
    if state_dict is not None:
        weights_classes = state_dict.get(CLASSIFIER_PREFIX + "weight")
        reset_head = num_classes is not None and weights_classes is not None and weights_classes.shape[0] != num_classes
        load_checked(model, _adapt_first_conv(model, state_dict), source=source, skip_classifier=reset_head)
    return FeatureListNet(model, out_indices) if features_only else model


def adapt_input_conv(weight: Tensor, in_chans: int) -> Tensor:
    """A first convolution's weight (O, I, kH, kW) made to take in_chans input channels, as timm's rule.

    One channel: the sum over the I channels (a grey image gives what its replication to I channels gave).
    Otherwise the I channels are repeated up to in_chans and scaled by I / in_chans, which keeps the response
    to an input whose channels are repeated likewise (timm: 3 / in_chans from RGB weights).
    """
    if weight.dim() != 4:
        raise ValueError(f"expected a (O, I, kH, kW) convolution weight, got shape {tuple(weight.shape)}")
    have = weight.shape[1]
    if in_chans == have:
        return weight
    # Computed in float32 at least, so half-precision weights are not rounded twice.
    work = weight.float() if weight.dtype in (torch.float16, torch.bfloat16) else weight
    if in_chans == 1:
        adapted = work.sum(dim=1, keepdim=True)
    else:
        repeats = math.ceil(in_chans / have)
        adapted = work.repeat(1, repeats, 1, 1)[:, :in_chans] * (have / in_chans)
    return adapted.to(weight.dtype)


def _adapt_first_conv(model: nn.Module, state_dict: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    """The state dict with its first convolution adapted to the model's input channels, where only those differ."""
    key = getattr(model, "first_conv", None)
    if key is None or key + ".weight" not in state_dict:
        return state_dict
    key += ".weight"
    given, expected = state_dict[key], model.state_dict()[key]
    same_otherwise = given.dim() == 4 and given.shape[:1] + given.shape[2:] == expected.shape[:1] + expected.shape[2:]
    if given.shape[1] == expected.shape[1] or not same_otherwise or not given.is_floating_point():
        return state_dict  # equal, or a difference the key / shape check reports
    return {**state_dict, key: adapt_input_conv(given, expected.shape[1])}


def skeleton(architecture: str, **model_kwargs) -> nn.Module:
    """The architecture built on the meta device: its keys and shapes without allocating weights."""
    with torch.device("meta"):
        model = get_architecture(architecture).build(**model_kwargs)
    model.architecture = architecture
    return model


def check_state_dict(state_dict: Mapping[str, Tensor], architecture: str, what: str, **model_kwargs) -> None:
    """Raise CheckpointError (one line) unless the state dict would load into the architecture as built."""
    model = skeleton(architecture, **model_kwargs)
    _raise_unless_loadable(model, state_dict, what, skip_classifier=False)


def infer_model_kwargs(state_dict: Mapping[str, Tensor]) -> dict:
    """Builder arguments a bare checkpoint implies: class count and whether its SN layers have a BN term."""
    kwargs: dict = {}
    if CLASSIFIER_PREFIX + "weight" in state_dict:
        kwargs["num_classes"] = int(state_dict[CLASSIFIER_PREFIX + "weight"].shape[0])
    if "sn1.mean_weight" in state_dict and state_dict["sn1.mean_weight"].numel() == 2:
        kwargs["using_bn"] = False
    return kwargs


def _sample(keys: Iterable[str], limit: int = 4) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", +{len(keys) - limit} more" if len(keys) > limit else "")


def _shape(t: Tensor) -> str:
    return "x".join(map(str, t.shape)) or "scalar"


def compare_state_dict(
    model: nn.Module, state_dict: Mapping[str, Tensor], skip_classifier: bool = False
) -> tuple[list[str], list[str], list[str]]:
    """Keys the checkpoint lacks, keys the model lacks, and keys whose shapes differ."""
    expected = model.state_dict()
    keep = (lambda k: not k.startswith(CLASSIFIER_PREFIX)) if skip_classifier else (lambda k: True)
    missing = [k for k in expected if keep(k) and k not in state_dict]
    unexpected = [k for k in state_dict if keep(k) and k not in expected]
    mismatched = [
        k for k in expected if keep(k) and k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    return missing, unexpected, mismatched


def first_non_finite(state_dict: Mapping[str, Tensor]) -> Optional[str]:
    """The first key whose floating-point tensor holds NaN or inf, or None when every value is finite."""
    for key, tensor in state_dict.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return key
    return None


def check_finite(state_dict: Mapping[str, Tensor], source: str = "checkpoint") -> None:
    """Raise CheckpointError naming the first floating-point tensor with NaN or inf values."""
    key = first_non_finite(state_dict)
    if key is not None:
        raise CheckpointError(f"{source}: tensor {key} has non-finite values (NaN/inf); the checkpoint is corrupt")


def check_values(
    model: nn.Module, state_dict: Mapping[str, Tensor], source: str = "checkpoint", skip_classifier: bool = False
) -> None:
    """Raise CheckpointError for the first tensor whose dtype or values the model cannot take.

    load_state_dict would silently cast integers into a floating-point parameter and copy NaN weights, so a
    broken export would only show as garbage predictions. Integer buffers (num_batches_tracked) stay legal.
    """
    expected = model.state_dict()
    kept = {k: v for k, v in state_dict.items() if not (skip_classifier and k.startswith(CLASSIFIER_PREFIX))}
    for key, tensor in kept.items():
        target = expected.get(key)
        if target is not None and target.is_floating_point() and not tensor.is_floating_point():
            raise CheckpointError(
                f"{source}: tensor {key} is {str(tensor.dtype).removeprefix('torch.')} but the model holds it as "
                f"floating point; the checkpoint is corrupt or was saved with the wrong dtype"
            )
    check_finite(kept, source)


def _hint(model: nn.Module, state_dict: Mapping[str, Tensor], missing, unexpected, mismatched) -> str:
    expected = model.state_dict()
    if any(k.endswith(("mean_weight", "var_weight")) for k in mismatched) or (
        missing and all(k.endswith(("running_mean", "running_var")) for k in missing) and not unexpected
    ):
        return "; the checkpoint's SN layers differ in using_bn (pass using_bn=False for [IN, LN] checkpoints)"
    if mismatched and all(k.startswith(CLASSIFIER_PREFIX) for k in mismatched):
        n = state_dict["fc.weight"].shape[0] if "fc.weight" in state_dict else "?"
        return f"; the checkpoint has {n} classes, the model {expected['fc.weight'].shape[0]}: pass num_classes"
    if any(k.endswith(("mean_fixed", "var_fixed", "radius")) for k in list(missing) + list(unexpected)):
        return "; SN and SSN checkpoints differ (SSN layers carry mean_fixed, var_fixed and radius)"
    return ""


def _raise_for_mismatch(
    model: nn.Module, state_dict: Mapping[str, Tensor], source: str, skip_classifier: bool
) -> None:
    missing, unexpected, mismatched = compare_state_dict(model, state_dict, skip_classifier)
    if not (missing or unexpected or mismatched):
        return
    expected = model.state_dict()
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys ({_sample(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys ({_sample(unexpected)})")
    if mismatched:
        shapes = [f"{k}: checkpoint {_shape(state_dict[k])} vs model {_shape(expected[k])}" for k in mismatched]
        parts.append(f"{len(mismatched)} shape mismatches ({_sample(shapes, 3)})")
    name = getattr(model, "architecture", type(model).__name__)
    hint = _hint(model, state_dict, missing, unexpected, mismatched)
    raise CheckpointError(f"{source} does not match {name}: {'; '.join(parts)}{hint}")


def _raise_unless_loadable(
    model: nn.Module, state_dict: Mapping[str, Tensor], source: str, skip_classifier: bool
) -> None:
    _raise_for_mismatch(model, state_dict, source, skip_classifier)
    check_values(model, state_dict, source, skip_classifier)


def load_checked(
    model: nn.Module, state_dict: Mapping[str, Tensor], source: str = "checkpoint", skip_classifier: bool = False
) -> None:
    """Load a state dict after checking every key, shape and dtype, and that its values are finite; one error
    line describes any difference.

    skip_classifier leaves the model's own (freshly initialised) classifier in place.
    """
    _raise_unless_loadable(model, state_dict, source, skip_classifier)
    if skip_classifier:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(CLASSIFIER_PREFIX)}
    model.load_state_dict(state_dict, strict=not skip_classifier)
