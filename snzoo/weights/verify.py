"""Checks a weights file must pass before it is used: checksums, then keys and shapes."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from snzoo.checkpoint import check_values, compare_state_dict, load_checked
from snzoo.entry import Source
from snzoo.errors import CheckpointError, SnzooError
from snzoo.models import get_architecture
from snzoo.weights.download import Digests


class ChecksumError(SnzooError):
    """A file whose bytes are not the ones the manifest pins."""


def check_digests(digests: Digests, source: Source, what: str) -> None:
    """Compare a file's digests with the source's pinned sha256 / md5 / size; raise ChecksumError on mismatch."""
    if source.size is not None and digests.size != source.size:
        raise ChecksumError(f"{what}: size {digests.size} bytes, expected {source.size}; the file is incomplete or not the published one")
    if source.sha256 and digests.sha256 != source.sha256:
        raise ChecksumError(f"{what}: sha256 {digests.sha256} does not match the pinned {source.sha256}; the file is corrupt or not the published one")
    if source.md5 and digests.md5 != source.md5.lower():
        raise ChecksumError(f"{what}: md5 {digests.md5} does not match the published {source.md5.lower()}; the file is corrupt or not the published one")


def is_pinned(source: Source) -> bool:
    """True when the source has a checksum to verify against."""
    return bool(source.sha256 or source.md5)


def skeleton(architecture: str, **kwargs) -> torch.nn.Module:
    """The architecture built on the meta device: its keys and shapes without allocating weights."""
    with torch.device("meta"):
        return get_architecture(architecture).build(**kwargs)


def check_structure(state_dict: Mapping[str, Tensor], architecture: str, what: str, **model_kwargs) -> None:
    """Raise CheckpointError (one line, the readable difference) unless keys and shapes match the model exactly,
    dtypes fit it and every value is finite."""
    model = skeleton(architecture, **model_kwargs)
    model.architecture = architecture
    if any(compare_state_dict(model, state_dict)):
        load_checked(model, state_dict, source=what)
    check_values(model, state_dict, source=what)


def infer_model_kwargs(state_dict: Mapping[str, Tensor]) -> dict:
    """Builder arguments a bare checkpoint implies: class count and whether its SN layers have a BN term."""
    kwargs: dict = {}
    if "fc.weight" in state_dict:
        kwargs["num_classes"] = int(state_dict["fc.weight"].shape[0])
    if "sn1.mean_weight" in state_dict and state_dict["sn1.mean_weight"].numel() == 2:
        kwargs["using_bn"] = False
    return kwargs


__all__ = ["ChecksumError", "CheckpointError", "check_digests", "is_pinned", "check_structure", "infer_model_kwargs",
           "skeleton"]
