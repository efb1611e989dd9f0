"""Weights maintenance: fetch checked weights, re-check cached files, convert users' checkpoints, pin files.

What `snzoo download`, `verify`, `convert` and `pin` do; every structural check goes through the builder's
(`snzoo.models.check_state_dict`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from snzoo import zoo
from snzoo._io import atomic_path
from snzoo.errors import ManifestError, OutputError, WeightsNotAvailableError
from snzoo.models import check_finite, check_state_dict, infer_model_kwargs
from snzoo.version import __version__
from snzoo.weights import (
    DETECTRON,
    cache_dir,
    cached_canonical,
    check_digests,
    fetch_weights,
    hash_file,
    is_pinned,
    read_record,
    read_state_dict,
    save_detectron_checkpoint,
    write_safetensors,
)
from snzoo.weights.convert import verify_canonical
from snzoo.zoo import Entry


def download(name: str, **fetch_options) -> Path:
    """Fetch, verify and convert the weights of a zoo entry into the cache; returns the canonical file.

    fetch_options go to `snzoo.weights.fetch_weights` (file, source_url, require_pinned, offline, progress).
    """
    return fetch_weights(zoo.get_entry(name), **fetch_options)


def verify_entry(name: str) -> dict:
    """Re-hash an entry's cached canonical file fully, check its record, pins, keys and shapes."""
    entry = zoo.get_entry(name)
    files = cached_canonical(entry, cache_dir())
    if not files:
        raise WeightsNotAvailableError(f"{entry.name} is not in the cache {cache_dir()}; fetch it with `snzoo download {entry.name}`")
    path = files[0]
    digests = verify_canonical(path, full=True)
    record = read_record(path) or {}
    entry.check_state_dict(read_state_dict(path), str(path))
    pins = [s for s in entry.sources if is_pinned(s)]
    return {
        "name": entry.name,
        "path": str(path),
        "sha256": digests.sha256,
        "size": digests.size,
        "source_sha256": record.get("source_sha256"),
        "source_md5": record.get("source_md5"),
        "pinned": bool(pins),
        "ok": True,
    }


def _matching_entries(sha256: str, md5: str) -> list[str]:
    return [
        e.name for e in zoo.manifest().entries.values()
        if any(s.sha256 == sha256 or (s.md5 and s.md5.lower() == md5) for s in e.sources)
    ]


def verify_file(path: os.PathLike | str, architecture: Optional[str] = None) -> dict:
    """Hash a checkpoint file, load it safely, and check it against an architecture when one is given."""
    path = Path(path)
    digests = hash_file(path) if path.is_file() else None
    state_dict = read_state_dict(path)  # raises for a missing, unreadable or unsafe file
    check_finite(state_dict, str(path))
    report = {"path": str(path), "sha256": digests.sha256, "md5": digests.md5, "size": digests.size,
              "tensors": len(state_dict), "entries": _matching_entries(digests.sha256, digests.md5), "ok": True}
    if architecture:
        kwargs = infer_model_kwargs(state_dict)
        check_state_dict(state_dict, architecture, str(path), **kwargs)
        report.update(architecture=architecture, **kwargs)
    return report


def convert_checkpoint(src: os.PathLike | str, dst: os.PathLike | str, architecture: str, *, to: str = "snzoo",
                       fpn: bool = False, **overrides) -> dict:
    """Convert a checkpoint (original format, state dict, safetensors or Detectron.pytorch) after checking it
    against the architecture.

    to="snzoo" writes canonical safetensors; to="detectron" writes ``{'model': state_dict}`` with torch.save in
    Detectron.pytorch's layout (keys under ``Conv_Body.``, or ``Conv_Body.conv_body.`` when fpn is True).
    """
    if to not in ("snzoo", DETECTRON):
        raise ValueError(f"to={to!r} is not known (expected 'snzoo' or {DETECTRON!r})")
    if fpn and to != DETECTRON:
        raise ValueError("fpn=True applies only to to='detectron'")
    src, dst = Path(src), Path(dst)
    state_dict = read_state_dict(src)
    kwargs = {**infer_model_kwargs(state_dict), **overrides}
    check_state_dict(state_dict, architecture, str(src), **kwargs)
    source = hash_file(src)
    if to == DETECTRON:
        digests = save_detectron_checkpoint(state_dict, dst, fpn=fpn)
    else:
        metadata = {"architecture": architecture, "source_sha256": source.sha256, "snzoo_version": __version__,
                    "format": "pt", **{k: json.dumps(v) for k, v in kwargs.items()}}
        try:
            digests = write_safetensors(state_dict, dst, metadata)
        except OSError as exc:
            raise OutputError.cannot_write(dst, exc) from None
    return {"src": str(src), "dst": str(dst), "architecture": architecture, "to": to, "fpn": fpn,
            "sha256": digests.sha256, "size": digests.size, "source_sha256": source.sha256, **kwargs}


def pin_file(name: str, path: os.PathLike | str, manifest_path: Optional[os.PathLike | str] = None) -> dict:
    """The sha256, md5 and size of a verified file of an entry; with manifest_path, write them into it.

    The file must load safely, match the entry's architecture, and agree with any checksum already published
    (e.g. the SSN md5s). The manifest file (the shipped one or an overlay) is rewritten atomically; an overlay
    that lacks the entry gets one with the entry's sources, pinned.
    """
    entry = zoo.get_entry(name)
    path = Path(path)
    digests = hash_file(path)
    source_index = next((i for i, s in enumerate(entry.sources) if s.file_name == path.name), 0)
    source = entry.sources[source_index]
    check_digests(digests, source, str(path))  # a file that contradicts a published checksum is not pinned
    entry.check_state_dict(read_state_dict(path), str(path))
    pins = {"sha256": digests.sha256, "md5": digests.md5, "size": digests.size}
    result = {"name": entry.name, "file": str(path), "source": source_index, **pins}
    if manifest_path is not None:
        _write_pins(Path(manifest_path), entry, source_index, pins)
        result["manifest"] = str(manifest_path)
    return result


def _write_pins(manifest_path: Path, entry: Entry, index: int, pins: dict) -> None:
    try:
        data = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"schema_version": 1, "entries": {}}
    except OSError as exc:
        raise OutputError.cannot_write(manifest_path, exc) from None
    except ValueError as exc:
        raise ManifestError(f"{manifest_path}: not valid JSON ({exc}); fix it before pinning into it") from None
    entries = data.setdefault("entries", {})
    target = entries.setdefault(entry.name, {})
    sources = target.get("sources") or [s.to_dict() for s in entry.sources]
    sources[index] = {**sources[index], "sha256": pins["sha256"], "md5": pins["md5"], "size": pins["size"]}
    target["sources"] = sources
    with atomic_path(manifest_path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        # Validated as an overlay on the shipped manifest: right for overlays and for a full manifest alike.
        zoo.load_manifest(overlay=tmp)


__all__ = ["convert_checkpoint", "download", "pin_file", "verify_entry", "verify_file"]
