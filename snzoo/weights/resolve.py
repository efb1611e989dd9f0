"""From a zoo entry to its state dict, through the local cache."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from snzoo.checkpoint import read_state_dict
from snzoo.errors import WeightsNotAvailableError
from snzoo.weights.cache import cache_dir, cache_path


def cached_weights_file(entry) -> Path:
    """The cached weights of an entry: its canonical safetensors file, else one of its sources' files."""
    directory = cache_dir()
    canonical = sorted(directory.glob(f"{entry.name}-*.safetensors")) if directory.is_dir() else []
    if canonical:
        return canonical[0]
    for source in entry.sources:
        path = cache_path(source.file_name, directory)
        if path.is_file():
            return path
    first = entry.sources[0]
    raise WeightsNotAvailableError(
        f"weights of {entry.name} are not in the cache {directory}: download {first.url} and save it as "
        f"{cache_path(first.file_name, directory)}, or pass checkpoint_path=FILE"
    )


def load_entry_state_dict(entry) -> dict[str, Tensor]:
    """The state dict of a zoo entry's pretrained weights."""
    return read_state_dict(cached_weights_file(entry))
