"""Where downloaded and converted weights live."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
from filelock import FileLock

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


def cache_lock(name: str, directory: Optional[Path] = None) -> FileLock:
    """The inter-process lock that serialises fetching `name` (an entry or a pinned file) into the cache."""
    locks = (Path(directory) if directory is not None else cache_dir()) / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    return FileLock(str(locks / f"{name}.lock"))


def _kind(path: Path) -> str:
    name = path.name
    if name.endswith(".safetensors"):
        return "canonical"
    if name.endswith(".safetensors.json"):
        return "record"
    if name.endswith((".part", ".tmp")):
        return "partial"
    return "original"


def cache_files(directory: Optional[Path] = None) -> list[dict]:
    """Every file in the cache (locks aside) with its kind: canonical, record, partial or original."""
    directory = Path(directory) if directory is not None else cache_dir()
    if not directory.is_dir():
        return []
    rows = []
    for path in sorted(p for p in directory.iterdir() if p.is_file()):
        kind = _kind(path)
        entry = path.name.rsplit("-", 1)[0] if kind in ("canonical", "record") else None
        rows.append({"file": path.name, "path": str(path), "kind": kind, "size": path.stat().st_size, "entry": entry})
    return rows


def clean_cache(entries: Optional[list[str]] = None, partial_only: bool = False, directory: Optional[Path] = None) -> list[Path]:
    """Delete cached files: all, only those of the named entries, or only partial downloads; returns them."""
    removed = []
    for row in cache_files(directory):
        if partial_only and row["kind"] != "partial":
            continue
        if entries is not None and row["entry"] not in entries:
            continue
        Path(row["path"]).unlink(missing_ok=True)
        removed.append(Path(row["path"]))
    return removed
