"""Key layouts other code uses for snzoo's v1 ResNets, each written once as data that both directions read.

Detectron.pytorch (the SN detection release, switchablenorms/SwitchNorm_Detection) stores a backbone as
``{'model': state_dict}`` with keys prefixed ``Conv_Body.`` (C4 models) or ``Conv_Body.conv_body.`` (FPN
models), the stem as ``res1.conv1`` / ``res1.sn1``, the stages as ``res2`` .. ``res5`` and the classifier as
``classifier``; inside a block the names are snzoo's (conv1, sn1, ..., downsample.0, downsample.1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import Tensor

from snzoo._io import PathLike, atomic_path
from snzoo.errors import CheckpointError
from snzoo.weights.download import Digests, hash_file

DETECTRON = "detectron"
DETECTRON_PREFIX = "Conv_Body."
DETECTRON_FPN_PREFIX = "Conv_Body.conv_body."

# (snzoo prefix, Detectron.pytorch prefix after Conv_Body[.conv_body].): the only table of this layout.
_DETECTRON_NAMES: tuple[tuple[str, str], ...] = (
    ("conv1.", "res1.conv1."),
    ("sn1.", "res1.sn1."),
    ("layer1.", "res2."),
    ("layer2.", "res3."),
    ("layer3.", "res4."),
    ("layer4.", "res5."),
    ("fc.", "classifier."),
)
# The detection SN registers these when using_moving_average is False: scratch sums of batch statistics that
# the batch-average pass refills before use, not trained state (running_mean / running_var hold that), and
# snzoo's SN layers have no such buffers. They are the only keys dropped when reading.
_SCRATCH_SUFFIXES = (".batch_mean", ".batch_var")


def _sample(keys: list[str], limit: int = 3) -> str:
    return ", ".join(keys[:limit]) + (f", +{len(keys) - limit} more" if len(keys) > limit else "")


def _rename(key: str, pairs: Iterable[tuple[str, str]]) -> str | None:
    for old, new in pairs:
        if key.startswith(old):
            return new + key[len(old):]
    return None


def is_detectron_layout(keys: Iterable[str]) -> bool:
    """True when the keys are Detectron.pytorch's (some key starts with ``Conv_Body.``)."""
    return any(k.startswith(DETECTRON_PREFIX) for k in keys)


def detectron_to_snzoo(state_dict: Mapping[str, Tensor], what: str = "checkpoint") -> dict[str, Tensor]:
    """A Detectron.pytorch backbone state dict (with or without the FPN prefix) in snzoo's key layout.

    batch_mean / batch_var buffers are dropped; any other key outside the layout raises one CheckpointError line.
    """
    fpn = any(k.startswith(DETECTRON_FPN_PREFIX) for k in state_dict)
    prefix = DETECTRON_FPN_PREFIX if fpn else DETECTRON_PREFIX
    reverse = [(det, ours) for ours, det in _DETECTRON_NAMES]
    out: dict[str, Tensor] = {}
    outside: list[str] = []
    for key, tensor in state_dict.items():
        if key.endswith(_SCRATCH_SUFFIXES):
            continue
        ours = _rename(key[len(prefix):], reverse) if key.startswith(prefix) else None
        if ours is None:
            outside.append(key)
        else:
            out[ours] = tensor
    if outside:
        raise CheckpointError(
            f"{what}: {len(outside)} keys outside the Detectron.pytorch backbone layout ({_sample(outside)}); "
            f"only {prefix}res1.conv1 / res1.sn1 (stem), res2..res5 (layer1..layer4) and classifier (fc) map to "
            "snzoo's keys: keep only the backbone's tensors")
    return out


def snzoo_to_detectron(state_dict: Mapping[str, Tensor], fpn: bool = False) -> dict[str, Tensor]:
    """snzoo's v1 ResNet keys in Detectron.pytorch's layout, prefixed for an FPN body when fpn is True."""
    prefix = DETECTRON_FPN_PREFIX if fpn else DETECTRON_PREFIX
    out: dict[str, Tensor] = {}
    outside: list[str] = []
    for key, tensor in state_dict.items():
        theirs = _rename(key, _DETECTRON_NAMES)
        if theirs is None:
            outside.append(key)
        else:
            out[prefix + theirs] = tensor
    if outside:
        raise CheckpointError(
            f"{len(outside)} keys have no place in the Detectron.pytorch ResNet layout ({_sample(outside)}); "
            "it holds v1 ResNets only (conv1, sn1, layer1..layer4, fc)")
    return out


def save_detectron_checkpoint(state_dict: Mapping[str, Tensor], dst: PathLike, fpn: bool = False) -> Digests:
    """Write ``{'model': state_dict}`` in Detectron.pytorch's layout with torch.save, atomically; its digests."""
    model = {k: v.detach().cpu().contiguous().clone() for k, v in snzoo_to_detectron(state_dict, fpn).items()}
    with atomic_path(Path(dst)) as tmp:
        torch.save({"model": model}, tmp)
        digests = hash_file(tmp)
    return digests


__all__ = ["DETECTRON", "DETECTRON_FPN_PREFIX", "DETECTRON_PREFIX", "detectron_to_snzoo", "is_detectron_layout",
           "save_detectron_checkpoint", "snzoo_to_detectron"]
