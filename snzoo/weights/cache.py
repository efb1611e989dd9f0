"""Where downloaded and converted weights live."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

from snzoo.errors import ManifestError


def cache_dir() -> Path:
    """SNZOO_CACHE, else $TORCH_HOME/hub/checkpoints/snzoo (torch.hub.get_dir() decides the base)."""
    configured = os.environ.get("SNZOO_CACHE")
    if configured:
        return Path(configured).expanduser()
    return Path(torch.hub.get_dir()) / "checkpoints" / "snzoo"


def cache_path(file_name: str, directory: Optional[Path] = None) -> Path:
    """The path of a file inside the cache, refusing names that would land outside it."""
    directory = Path(directory) if directory is not None else cache_dir()
    if not file_name or Path(file_name).name != file_name or file_name in (".", ".."):
        raise ManifestError(f"file name {file_name!r} is not a plain file name; it would escape the cache {directory}")
    return directory / file_name
