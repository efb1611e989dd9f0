"""From a zoo entry to a verified canonical safetensors file in the cache.

Order of attempts: a file the user names (`file=`), then a verified cached canonical file, then the
entry's original files already placed in the cache, then a mirror (SNZOO_MIRROR), then the manifest's
sources in order (or one `source_url`). Each download lands in a partial file beside its final place, is
checked (checksum, then keys and shapes after a weights-only load) and converted; nothing unverified is
ever left under a final name. A file lock per entry keeps concurrent processes from racing.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Iterator, Optional

from filelock import FileLock

from snzoo._io import env_flag
from snzoo.errors import CheckpointError, SnzooError, UnpinnedWeightsWarning, WeightsNotAvailableError
from snzoo.weights.cache import cache_dir, cache_lock, cache_path
from snzoo.weights.convert import read_record, record_path, verify_canonical, write_canonical
from snzoo.errors import ChecksumError
from snzoo.weights.download import hash_file
from snzoo.weights.layouts import DETECTRON
from snzoo.weights.pins import check_digests, is_pinned
from snzoo.weights.sources import download_candidates, fetch_to_partial, local_path, offline_mode, source_kind
from snzoo.weights.state_dict import read_state_dict
from snzoo.zoo.entry import Entry, Source

PARTIAL_SUFFIX = ".part"


def require_pinned_default() -> bool:
    """SNZOO_REQUIRE_PINNED set to a true value."""
    return env_flag("SNZOO_REQUIRE_PINNED")


def entry_lock(entry: Entry, directory: Path) -> FileLock:
    """The inter-process lock that serialises fetching one entry."""
    return cache_lock(entry.name, directory)


def cached_canonical(entry: Entry, directory: Path) -> list[Path]:
    """Canonical files of an entry in the cache, newest first."""
    if not directory.is_dir():
        return []
    files = [p for p in directory.glob(f"{entry.name}-*.safetensors") if p.name.count(".safetensors") == 1]
    return sorted(files, key=lambda p: p.stat().st_mtime, reverse=True)


def _matches_pins(entry: Entry, path: Path) -> bool:
    record = read_record(path) or {}
    pinned = [s for s in entry.sources if is_pinned(s)]
    if not pinned:
        return True
    return any(
        (s.sha256 and s.sha256 == record.get("source_sha256")) or (s.md5 and s.md5.lower() == record.get("source_md5"))
        for s in pinned
    )


def find_cached(entry: Entry, directory: Optional[Path] = None, full_check: bool = True) -> Optional[Path]:
    """A verified canonical file of the entry; damaged ones are reported (warning), removed and skipped."""
    directory = Path(directory) if directory is not None else cache_dir()
    for path in cached_canonical(entry, directory):
        if not _matches_pins(entry, path):
            continue  # converted from a file the manifest no longer pins
        try:
            verify_canonical(path, full=full_check)
            return path
        except CheckpointError as exc:
            warnings.warn(f"{exc}; removing it and fetching again", stacklevel=3)
            path.unlink(missing_ok=True)
            record_path(path).unlink(missing_ok=True)
    return None


def _candidates(entry: Entry, directory: Path, source_url: Optional[str], offline: bool) -> Iterator[tuple[Source, bool]]:
    """(source, is_ours) pairs in the order to try; is_ours marks files the cache may delete."""
    sources = list(entry.sources)
    if source_url:
        sources = [replace(sources[0], url=source_url, kind=source_kind(source_url))]
    for source in sources:  # files the user placed in the cache by hand, as the offline message asks
        placed = cache_path(source.file_name, directory)
        if placed.is_file():
            yield replace(source, url=str(placed), kind="file"), False
    for candidate in download_candidates(sources, offline, mirror=not source_url):
        yield candidate, True


def _describe(source: Source) -> str:
    return f"{source.kind} {source.url}"


def _offline_message(entry: Entry, directory: Path) -> str:
    source = entry.sources[0]
    if source.sha256:
        digest = f"sha256 {source.sha256}"
    elif source.md5:
        digest = f"md5 {source.md5}"
    else:
        digest = "no published checksum (check the file yourself, then pin it with `snzoo pin`)"
    return (
        f"offline (SNZOO_OFFLINE / HF_HUB_OFFLINE) and the weights of {entry.name} are not cached: download "
        f"{source.url} elsewhere and put it at {cache_path(source.file_name, directory)} ({digest}), "
        "or pass --file PATH"
    )


def install_source(entry: Entry, source: Source, directory: Path, owned: bool, progress: Optional[bool] = None) -> Path:
    """Fetch one source, verify it (checksums, then keys, shapes and values) and convert it into the entry's
    canonical file; returns that file."""
    what = f"{entry.name} from {source.url}"
    if owned:
        partial = cache_path(source.file_name + PARTIAL_SUFFIX, directory)
        digests = fetch_to_partial(source, partial, progress=progress)
        candidate = partial
    else:
        candidate = local_path(source.url)
        digests = hash_file(candidate)
    try:
        check_digests(digests, source, what)
        # A source in another code's key layout is renamed here, so the canonical file has snzoo's keys.
        state_dict = read_state_dict(candidate, layout=DETECTRON if source.format == DETECTRON else None)
        entry.check_state_dict(state_dict, what)
    except (ChecksumError, CheckpointError):
        if owned:
            candidate.unlink(missing_ok=True)  # wrong bytes: never resume from them
        raise
    if not is_pinned(source):
        warnings.warn(
            UnpinnedWeightsWarning(
                f"{entry.name}: no checksum is published for {source.file_name}; accepted the file with sha256 "
                f"{digests.sha256} ({digests.size} bytes) after a structural check. Pin it with "
                f"`snzoo pin {entry.name} FILE --write MANIFEST`, or refuse unpinned files with --require-pinned "
                "(SNZOO_REQUIRE_PINNED=1)"
            ),
            stacklevel=3,
        )
    path = write_canonical(directory, entry.name, state_dict, digests, source.url)
    if owned:
        candidate.unlink(missing_ok=True)
    return path


def fetch_weights(
    entry: Entry,
    *,
    file: Optional[os.PathLike | str] = None,
    source_url: Optional[str] = None,
    require_pinned: Optional[bool] = None,
    offline: Optional[bool] = None,
    progress: Optional[bool] = None,
) -> Path:
    """The verified canonical safetensors file of an entry, fetched and converted if needed.
    Nothing enters the cache before its checksums and the entry's structural check
    (`Entry.check_state_dict`) pass.
    file: a checkpoint the user downloaded by hand (verified like any source, then converted into the cache).
    source_url: try only this URL (or path, hf-hub:..., Google Drive link) instead of the manifest's sources.
    require_pinned: refuse sources without a published checksum (default: SNZOO_REQUIRE_PINNED).
    offline: only the cache and local files (default: SNZOO_OFFLINE or HF_HUB_OFFLINE).
    """
    directory = cache_dir()
    require_pinned = require_pinned_default() if require_pinned is None else require_pinned
    offline = offline_mode() if offline is None else offline
    directory.mkdir(parents=True, exist_ok=True)
    with entry_lock(entry, directory):
        if file is not None:
            given = replace(entry.sources[0], url=str(Path(file).expanduser()), kind="file")
            if not Path(given.url).is_file():
                raise WeightsNotAvailableError(f"--file {file}: no such file")
            _refuse_unpinned(entry, given, require_pinned)
            return install_source(entry, given, directory, owned=False, progress=progress)
        cached = find_cached(entry, directory)
        if cached is not None:
            return cached
        failures = []
        for source, owned in _candidates(entry, directory, source_url, offline):
            try:
                _refuse_unpinned(entry, source, require_pinned)
                return install_source(entry, source, directory, owned, progress)
            except SnzooError as exc:
                failures.append(f"{_describe(source)}: {exc}")
        if offline and not failures:
            raise WeightsNotAvailableError(_offline_message(entry, directory))
        if not failures:
            raise WeightsNotAvailableError(f"{entry.name} has no source to fetch from")
        raise WeightsNotAvailableError(
            f"could not get the weights of {entry.name}: " + " | ".join(failures)
            + f" (a file downloaded by hand works too: --file PATH, or put it at "
            f"{cache_path(entry.sources[0].file_name, directory)})"
        )


def _refuse_unpinned(entry: Entry, source: Source, require_pinned: bool) -> None:
    if require_pinned and not is_pinned(source):
        raise ChecksumError(
            f"refused: {entry.name} has no published checksum for {source.file_name} and pinned checksums are "
            "required (--require-pinned / SNZOO_REQUIRE_PINNED); pin it with `snzoo pin` in an overlay manifest"
        )


__all__ = ["fetch_weights", "find_cached", "install_source", "require_pinned_default"]
