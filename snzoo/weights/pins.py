"""A file against the checksums the manifest pins for it."""

from __future__ import annotations

from snzoo.errors import ChecksumError
from snzoo.weights.download import Digests
from snzoo.zoo.entry import Source


def check_digests(digests: Digests, source: Source, what: str) -> None:
    """Compare a file's digests with the source's pinned sha256 / md5 / size; raise ChecksumError on mismatch."""
    if source.size is not None and digests.size != source.size:
        raise ChecksumError(f"{what}: size {digests.size} bytes, expected {source.size}; the file is incomplete or not the published one")
    if source.sha256 and digests.sha256 != source.sha256:
        raise ChecksumError(f"{what}: sha256 {digests.sha256} does not match the pinned {source.sha256}; the file is corrupt or not the published one")
    if source.md5 and digests.md5 != source.md5.lower():
        raise ChecksumError(f"{what}: md5 {digests.md5} does not match the published {source.md5.lower()}; the file is corrupt or not the published one")


def is_pinned(source: Source) -> bool:
    """True when the source has a checksum to verify against."""
    return bool(source.sha256 or source.md5)
