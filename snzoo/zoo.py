"""The zoo: the current manifest (shipped plus any user overlay) and lookups of architectures and entries.

The overlay is chosen with :func:`set_overlay` (the CLI's ``--manifest``) or the ``SNZOO_MANIFEST``
environment variable.
"""

from __future__ import annotations

import fnmatch
import os
import threading
from pathlib import Path
from typing import Any, Mapping

from snzoo.entry import EvalConfig, Entry, Metrics, NormConfig, Source
from snzoo.manifest import Manifest, PathLike, registered_architectures, load_manifest

__all__ = [
    "MANIFEST_ENV",
    "Source",
    "NormConfig",
    "Metrics",
    "EvalConfig",
    "Entry",
    "Manifest",
    "load_manifest",
    "manifest",
    "set_overlay",
    "list_models",
    "get_entry",
    "zoo_table_markdown",
]

MANIFEST_ENV = "SNZOO_MANIFEST"



_lock = threading.RLock()
_explicit_overlay: Path | None = None
_cache: tuple[tuple, Manifest] | None = None


def _overlay_key(overlay: Path | None) -> tuple:
    if overlay is None:
        return (None,)
    try:
        st = overlay.stat()
    except OSError:
        return (str(overlay), None)
    # An edited overlay file is picked up without restarting.
    return (str(overlay), st.st_mtime_ns, st.st_size)


def _active_overlay() -> Path | None:
    if _explicit_overlay is not None:
        return _explicit_overlay
    env = os.environ.get(MANIFEST_ENV, "").strip()
    return Path(env) if env else None


def manifest() -> Manifest:
    """The current manifest: the shipped one plus the overlay of :func:`set_overlay` or ``SNZOO_MANIFEST``."""
    global _cache
    with _lock:
        overlay = _active_overlay()
        key = _overlay_key(overlay)
        if _cache is None or _cache[0] != key:
            _cache = (key, load_manifest(overlay=overlay))
        return _cache[1]


def set_overlay(path: PathLike | None) -> None:
    """Merge an overlay manifest into the current one (validated now); None clears it.

    An overlay set here wins over ``SNZOO_MANIFEST``; after ``set_overlay(None)`` the variable applies again.
    """
    global _explicit_overlay, _cache
    with _lock:
        if path is None:
            _explicit_overlay = None
            _cache = None
            return
        overlay = Path(path)
        loaded = load_manifest(overlay=overlay)
        _explicit_overlay = overlay
        _cache = (_overlay_key(overlay), loaded)


# --------------------------------------------------------------------------------------------- lookups


def list_models(pattern: str = "*", pretrained: bool = False) -> list[str]:
    """Sorted names matching an fnmatch pattern.

    Without ``pretrained``: architecture names (anything :func:`snzoo.create_model` can build).
    With ``pretrained``: ``ARCH.TAG`` zoo entries whose name or architecture matches.
    """
    if pretrained:
        return manifest().list_entries(pattern)
    pattern = pattern.lower()
    return sorted(a for a in registered_architectures() if fnmatch.fnmatchcase(a, pattern))


def get_entry(name: str) -> Entry:
    """The zoo entry ``ARCH.TAG``, or for a bare ``ARCH`` its default entry."""
    return manifest().get_entry(name)


def _schedule_words(recipe: Mapping[str, Any]) -> str:
    sched = recipe["schedule"]
    warm = f"warmup {sched['warmup_epochs']} + " if sched.get("warmup_epochs") else ""
    if sched["type"] == "step":
        return f"{recipe['epochs']}, {warm}step {'/'.join(str(m) for m in sched['milestones'])}"
    return f"{recipe['epochs']}, {warm}{sched['type']}"


def _checksum_kind(entry: Entry) -> str:
    if any(s.sha256 for s in entry.sources):
        return "sha256"
    if any(s.md5 for s in entry.sources):
        return "md5"
    return "none"


def zoo_table_markdown(manifest: Manifest | None = None) -> str:
    """The zoo as a Markdown table, one row per entry in manifest order (the README's table)."""
    m = manifest if manifest is not None else _current_manifest()

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    rows = ["| Entry | Architecture | Batch | Top-1 | Top-5 | Epochs, schedule | Checksum |",
            "|---|---|---|---:|---:|---|---|"]
    for entry in m.entries.values():
        metrics = entry.metrics.get(entry.eval.dataset) or next(iter(entry.metrics.values()), Metrics(None, None))
        batch = entry.recipe["batch"]
        name = f"`{entry.name}`" + (" (default)" if entry.default else "")
        rows.append(f"| {name} | {entry.architecture} | {batch['devices']}x{batch['per_device']} | "
                    f"{pct(metrics.top1)} | {pct(metrics.top5)} | {_schedule_words(entry.recipe)} | "
                    f"{_checksum_kind(entry)} |")
    return "\n".join(rows) + "\n"


_current_manifest = manifest
