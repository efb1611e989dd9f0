"""Getting the bytes of one source into a partial file: http(s), local files, Google Drive, Hugging Face Hub.

The Hub is reached through one function, `hub_download`, for weights sources and `hf-hub:` model folders alike.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Optional, Sequence
from urllib.parse import quote, unquote, urlparse

from snzoo._io import env_flag, first_line
from snzoo.errors import DownloadError, UnknownModelError, WeightsNotAvailableError
from snzoo.version import __version__
from snzoo.weights.download import Digests, download_to_partial, hash_file
from snzoo.zoo.entry import Source

HF_PREFIX = "hf-hub:"
PACKAGE_PREFIX = "package:"


def source_kind(url: str) -> str:
    """The manifest's kind for a URL or path given on the command line."""
    if url.startswith(HF_PREFIX):
        return "hf-hub"
    if url.startswith(PACKAGE_PREFIX):
        return "package"
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https"):
        return "gdrive" if parsed.netloc == "drive.google.com" else "https"
    return "file"


def local_path(url: str) -> Path:
    """The path of a file:// URL, a package: file shipped inside snzoo, or a plain path."""
    if url.startswith(PACKAGE_PREFIX):
        from importlib import resources

        return Path(str(resources.files("snzoo") / url[len(PACKAGE_PREFIX):]))
    if url.startswith("file://"):
        return Path(unquote(urlparse(url).path))
    return Path(url).expanduser()


@dataclass(frozen=True)
class HubFile:
    repo_id: str
    filename: str
    revision: Optional[str]


def parse_hf_url(url: str) -> HubFile:
    """Split `hf-hub:ORG/REPO[@REVISION]/FILE`."""
    parts = url[len(HF_PREFIX):].split("/", 2)
    if len(parts) < 3 or not all(parts):
        raise DownloadError(f"{url!r} is not a Hugging Face Hub file; expected hf-hub:ORG/REPO[@REVISION]/FILE")
    try:
        repo_id, revision = parse_hub_repo("/".join(parts[:2]))
    except UnknownModelError:
        raise DownloadError(f"{url!r} is not a Hugging Face Hub file; expected hf-hub:ORG/REPO[@REVISION]/FILE") from None
    return HubFile(repo_id, parts[2], revision)


def mirror_source(base: str, source: Source) -> Source:
    """The same file (same checksums) fetched from a mirror base URL or directory."""
    url = base.rstrip("/") + "/" + quote(source.file_name, safe="")
    if source_kind(base) == "file":
        url = str(local_path(base) / source.file_name)
    return replace(source, url=url, kind=source_kind(url))


def offline_mode() -> bool:
    """SNZOO_OFFLINE or HF_HUB_OFFLINE set to a true value: use only the cache and local files."""
    return env_flag("SNZOO_OFFLINE") or env_flag("HF_HUB_OFFLINE")


def reachable_offline(source: Source) -> bool:
    """Sources that need no network: local and shipped files (and Hub files already in the Hugging Face cache)."""
    return source.kind in ("file", "package", "hf-hub")


def download_candidates(sources: Sequence[Source], offline: bool, *, mirror: bool = True) -> Iterator[Source]:
    """The places to fetch `sources`' files from, in order: their copies on the mirror (SNZOO_MIRROR, unless
    `mirror` is False), then the sources themselves; offline, only the ones reachable without a network."""
    base = os.environ.get("SNZOO_MIRROR", "").strip() if mirror else ""
    candidates = [mirror_source(base, source) for source in sources] if base else []
    for candidate in candidates + list(sources):
        if not offline or reachable_offline(candidate):
            yield candidate


def _copy_into(src: Path, partial: Path) -> Digests:
    if not src.is_file():
        raise DownloadError(f"{src}: no such file")
    shutil.copyfile(src, partial)
    return hash_file(partial)


def download_timeout() -> float:
    """Seconds to wait for a connection or for data before retrying (SNZOO_DOWNLOAD_TIMEOUT, default 30)."""
    value = os.environ.get("SNZOO_DOWNLOAD_TIMEOUT", "").strip()
    try:
        return float(value) if value else 30.0
    except ValueError:
        raise DownloadError(f"SNZOO_DOWNLOAD_TIMEOUT={value!r} is not a number of seconds") from None


def fetch_to_partial(source: Source, partial: Path, *, progress: Optional[bool] = None, timeout: Optional[float] = None) -> Digests:
    """Bring the source's bytes into `partial` and return their digests."""
    timeout = download_timeout() if timeout is None else timeout
    if source.kind == "https":
        return download_to_partial(source.url, partial, expected_size=source.size, progress=progress, timeout=timeout)
    if source.kind in ("file", "package"):
        return _copy_into(local_path(source.url), partial)
    if source.kind == "gdrive":
        return _fetch_gdrive(source, partial, progress, timeout)
    if source.kind == "hf-hub":
        return _copy_into(_hf_hub_file(source.url), partial)
    raise DownloadError(f"unknown source kind {source.kind!r} for {source.url}")


def _fetch_gdrive(source: Source, partial: Path, progress: Optional[bool], timeout: float) -> Digests:
    import gdown

    # gdown follows Google Drive's confirmation page for large files; resume reuses the partial file.
    quiet = not progress if progress is not None else True
    try:
        result = gdown.download(url=source.url, output=str(partial), quiet=quiet, resume=partial.exists(),
                                timeout=timeout, retries=3)
    except Exception as exc:  # gdown raises its own and requests' errors
        raise DownloadError(f"Google Drive download of {source.url} failed: {_gdown_reason(exc)}; "
                            "use a mirror or --file") from None
    if result is None or not partial.is_file():
        raise DownloadError(f"Google Drive download of {source.url} failed (the link may be dead or over its quota); use a mirror or --file")
    return hash_file(partial)


def _gdown_reason(exc: Exception) -> str:
    """gdown's error on one line; its page errors put the cause in the paragraph after a heading ending in ':'."""
    paragraphs = [" ".join(line.strip() for line in p.splitlines()) for p in str(exc).strip().split("\n\n")]
    paragraphs = [p for p in paragraphs if p]
    if not paragraphs:
        return type(exc).__name__
    if len(paragraphs) > 1 and paragraphs[0].endswith(":"):
        return paragraphs[1]
    return paragraphs[0]


def _hf_hub_file(url: str) -> Path:
    hub = parse_hf_url(url)
    return hub_download(hub.repo_id, hub.filename, hub.revision, url)


def parse_hub_repo(spec: str) -> tuple[str, Optional[str]]:
    """Split `ORG/REPO[@REVISION]` into the repo id and the revision (None: the default branch)."""
    repo_id, at, revision = spec.partition("@")
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(parts) or (at and not revision):
        raise UnknownModelError(f"{spec!r} is not a Hugging Face Hub model; expected ORG/REPO or ORG/REPO@REVISION")
    return repo_id, revision or None


def hub_download(repo_id: str, filename: str, revision: Optional[str], label: str) -> Path:
    """A file of a Hugging Face Hub repository through the huggingface_hub cache (only the cache when offline).

    Any failure is one WeightsNotAvailableError line that starts with `label` and says why.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    # Transport failures surface as the Hub client's HTTP library errors (requests, httpx or httpx2 by
    # version), which share HfHubHTTPError's parent class but not always OSError.
    transport = tuple(c for c in HfHubHTTPError.__mro__[1:] if c.__name__ == "HTTPError")
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, local_files_only=offline_mode(),
                                    library_name="snzoo", library_version=__version__))
    except LocalEntryNotFoundError:
        reason = (f"{filename} is not in the Hugging Face cache and the Hub is "
                  + ("offline (SNZOO_OFFLINE / HF_HUB_OFFLINE)" if offline_mode() else "unreachable"))
    except RepositoryNotFoundError:
        reason = "no such repository on the Hub (or it is private or gated: log in with `hf auth login`)"
    except RevisionNotFoundError:
        reason = f"no revision {revision!r} in the repository"
    except EntryNotFoundError:
        reason = f"the repository has no {filename}"
    except (HfHubHTTPError, OSError, ValueError, *transport) as exc:
        reason = f"{filename}: {first_line(exc)}"
    raise WeightsNotAvailableError(f"{label}: {reason}")
