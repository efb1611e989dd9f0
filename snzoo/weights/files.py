"""A single pinned file (not a checkpoint) fetched into the cache and verified like weights: label files and the
like. The same sources, mirror (SNZOO_MIRROR), offline rule and checksums as pretrained weights."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from snzoo.errors import ChecksumError, SnzooError, WeightsNotAvailableError
from snzoo.weights.cache import cache_dir, cache_lock, cache_path
from snzoo.weights.download import hash_file
from snzoo.weights.pins import check_digests
from snzoo.weights.sources import download_candidates, fetch_to_partial, offline_mode
from snzoo.zoo.entry import Source


def fetch_file(source: Source, what: str, *, offline: Optional[bool] = None, progress: Optional[bool] = None,
               option: str = "--file") -> Path:
    """The cached copy of `source`'s file, downloaded and checked against its pins when it is not there yet.

    A cached copy is re-hashed before use; one that no longer matches is removed and fetched again. Offline
    (SNZOO_OFFLINE / HF_HUB_OFFLINE) only the cache and local files are tried, and the error says where to put
    a copy made elsewhere. `what` names the file in messages; `option` is how a user passes a local copy.
    """
    directory = cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    target = cache_path(source.file_name, directory)
    offline = offline_mode() if offline is None else offline
    with cache_lock(source.file_name, directory):
        if target.is_file():
            try:
                check_digests(hash_file(target), source, f"cached {what} {target}")
                return target
            except ChecksumError:
                target.unlink()  # a damaged copy is never used, and never left to be used later
        failures = []
        for candidate in download_candidates([source], offline):
            partial = target.with_name(target.name + ".part")
            try:
                digests = fetch_to_partial(candidate, partial, progress=progress)
                check_digests(digests, source, f"{what} from {candidate.url}")
            except SnzooError as exc:
                partial.unlink(missing_ok=True)
                failures.append(str(exc))
                continue
            partial.replace(target)  # verified, so it may take the final name
            return target
    digest = f"sha256 {source.sha256}" if source.sha256 else "no published checksum"
    if not failures:
        raise WeightsNotAvailableError(
            f"offline (SNZOO_OFFLINE / HF_HUB_OFFLINE) and {what} is not cached: download {source.url} elsewhere "
            f"and put it at {target} ({digest}), or pass {option} FILE")
    raise WeightsNotAvailableError(f"could not get {what}: {' | '.join(failures)} (a copy made elsewhere works too: "
                                   f"put it at {target} or pass {option} FILE)")
