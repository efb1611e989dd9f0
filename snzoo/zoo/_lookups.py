"""The current manifest (shipped plus any user overlay) and lookups of architectures and entries.

The overlay is chosen with :func:`set_overlay` (the CLI's ``--manifest``) or the ``SNZOO_MANIFEST``
environment variable.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from snzoo._io import PathLike
from snzoo.models.registry import list_architectures
from snzoo.zoo._manifest import Manifest, load_manifest
from snzoo.zoo.entry import Entry

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
    return list_architectures(pattern)


def get_entry(name: str) -> Entry:
    """The zoo entry ``ARCH.TAG``, or for a bare ``ARCH`` its default entry."""
    return manifest().get_entry(name)
