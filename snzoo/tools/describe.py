"""What `snzoo info` reports about a name, as plain data."""

from __future__ import annotations

from snzoo import zoo
from snzoo.errors import UnknownModelError
from snzoo.models import get_architecture, skeleton
from snzoo.weights import cache_dir


def count_parameters(model) -> int:
    """Number of parameter elements of a model."""
    return sum(p.numel() for p in model.parameters())


def describe(name: str) -> dict:
    """Architecture facts (parameters, state_dict keys), the zoo entry if any, its sibling entries and the cache.

    `name` is an architecture or an `ARCH.TAG` entry; a bare architecture describes its default entry when it
    has one.
    """
    entry = None
    if "." in name:
        entry = zoo.get_entry(name)
        arch = entry.architecture
    else:
        arch = get_architecture(name).name
        try:
            entry = zoo.get_entry(arch)
        except UnknownModelError:
            entry = None
    spec = get_architecture(arch)
    model = skeleton(arch, **(entry.model_kwargs() if entry else {}))
    return {
        "name": entry.name if entry else arch,
        "architecture": arch,
        "depth": spec.depth,
        "version": spec.version,
        "norm": spec.norm,
        "param_count": count_parameters(model),
        "state_dict_keys": len(model.state_dict()),
        "entry": entry.to_dict() if entry else None,
        "entries": zoo.list_models(arch, pretrained=True),
        "cache_dir": str(cache_dir()),
    }


__all__ = ["count_parameters", "describe"]
