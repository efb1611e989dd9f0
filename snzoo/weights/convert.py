"""Canonical weights: safetensors files with no 'module.' prefix, written atomically with a digest record."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Optional

from torch import Tensor

from snzoo._io import atomic_path, atomic_write_text
from snzoo.errors import CheckpointError
from snzoo.version import __version__
from snzoo.weights.download import Digests, hash_file

RECORD_SUFFIX = ".json"


def canonical_file_name(entry_name: str, source_sha256: str) -> str:
    """`ARCH.TAG-<first 8 hex digits of the source file's sha256>.safetensors`."""
    return f"{entry_name}-{source_sha256[:8]}.safetensors"


def record_path(path: Path) -> Path:
    """Where the digest record of a canonical file lives (beside it)."""
    return path.with_name(path.name + RECORD_SUFFIX)


def write_safetensors(state_dict: Mapping[str, Tensor], dst: Path, metadata: Optional[dict] = None) -> Digests:
    """Write tensors to dst through a temporary file in the same directory, renamed into place when complete."""
    from safetensors.torch import save_file

    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    # Checkpoints may hold views of one storage; safetensors needs each tensor to own its memory.
    tensors = {k: v.detach().contiguous().clone() for k, v in state_dict.items()}
    with atomic_path(dst) as tmp:
        save_file(tensors, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
        digests = hash_file(tmp)
    return digests


def write_canonical(
    directory: Path, entry_name: str, state_dict: Mapping[str, Tensor], source: Digests, source_url: str
) -> Path:
    """Convert a verified state dict into the cache's canonical safetensors file and record its digest."""
    path = Path(directory) / canonical_file_name(entry_name, source.sha256)
    metadata = {
        "entry": entry_name,
        "source_sha256": source.sha256,
        "source_md5": source.md5,
        "source_url": source_url,
        "snzoo_version": __version__,
        "format": "pt",
    }
    digests = write_safetensors(state_dict, path, metadata)
    record = {"entry": entry_name, "sha256": digests.sha256, "size": digests.size,
              "source_sha256": source.sha256, "source_md5": source.md5, "source_url": source_url}
    atomic_write_text(record_path(path), json.dumps(record, indent=1) + "\n")
    return path


def read_record(path: Path) -> Optional[dict]:
    """The digest record of a canonical file, or None when it is missing or unreadable."""
    try:
        record = json.loads(record_path(path).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and {"sha256", "size"} <= set(record) else None


def verify_canonical(path: Path, full: bool = True) -> Digests:
    """Check a canonical file against its record (size, and the full sha256 unless full=False)."""
    record = read_record(path)
    if record is None:
        raise CheckpointError(f"{path}: no digest record beside it ({record_path(path).name}); it cannot be trusted")
    size = path.stat().st_size
    if size != record["size"]:
        raise CheckpointError(f"{path}: size {size} bytes, recorded {record['size']}; the cached file is damaged")
    if not full:
        return Digests(sha256=record["sha256"], md5="", size=size)
    digests = hash_file(path)
    if digests.sha256 != record["sha256"]:
        raise CheckpointError(f"{path}: sha256 {digests.sha256} differs from the recorded {record['sha256']}; the cached file is damaged")
    return digests
