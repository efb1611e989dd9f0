"""Fetching one file over HTTP(S) into a partial file: resumable, retried, hashed while it is written."""

from __future__ import annotations

import hashlib
import http
import http.client
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import requests
import urllib3
from tqdm import tqdm

from snzoo._io import NoProgressBar, first_line
from snzoo.errors import DownloadError
from snzoo.version import __version__

_CHUNK = 1 << 20
_STREAM_CHUNK = 1 << 16
# A server asking for a longer pause than this is treated as if it had asked for this much.
_MAX_RETRY_AFTER = 60.0


@dataclass(frozen=True)
class Digests:
    """Hex digests and byte count of a file's content."""

    sha256: str
    md5: str
    size: int


def hash_file(path: Path) -> Digests:
    """The sha256, md5 and size of a file, read in 1 MiB chunks."""
    sha, md5 = hashlib.sha256(), hashlib.md5()
    size = _feed(Path(path), sha, md5)
    return Digests(sha.hexdigest(), md5.hexdigest(), size)


def download_to_partial(
    url: str,
    partial: Path,
    *,
    expected_size: int | None = None,
    timeout: float = 30.0,
    retries: int = 4,
    backoff: float = 0.5,
    progress: bool | None = None,
    session: requests.Session | None = None,
) -> Digests:
    """Download ``url`` into ``partial`` and return the digests of the bytes written there.

    ``partial`` is a temporary file beside the final one; the caller checks the digests, then renames it
    into place or deletes it. Nothing here touches any other path.

    Resuming: an existing ``partial`` is taken as the start of the file and only the rest is asked for
    (``Range: bytes=N-``). A 206 answer whose Content-Range starts at N is appended after hashing the
    bytes already there. A 200 answer (no Range support), a Content-Range starting elsewhere, or a 416
    that does not prove the file complete restarts from byte zero. A 416 counts as done when the partial
    already holds ``expected_size`` bytes (or, without ``expected_size``, as many bytes as the 416's
    Content-Range total). A partial longer than ``expected_size`` is discarded before asking.

    Retrying: connection errors, timeouts (``timeout`` seconds to connect and for each read), HTTP 5xx and
    429, and bodies shorter than their Content-Length are retried up to ``retries`` times after the
    first attempt, sleeping ``backoff * 2**attempt`` seconds (longer if a 429/503 says Retry-After);
    each retry resumes from what is on disk. Other 4xx answers, HTML pages (login or confirmation pages
    served instead of the file), TLS errors and redirect loops fail at once.

    Keeping the partial: on failure ``partial`` is kept, so a later call resumes from it, unless the
    failure shows that its content is wrong: the server's file has another size than ``expected_size``,
    or a restart from zero was needed but the server would not send the file from its start. Then
    ``partial`` is deleted before ``DownloadError`` is raised.

    A tqdm progress bar goes to stderr when ``progress`` is True, or when it is None and stderr is a
    terminal. Raises ``DownloadError`` with a one-line message on every failure.
    """
    if urlsplit(url).scheme not in ("http", "https"):
        raise DownloadError(f"{url!r} is not an http(s) URL; give a URL that starts with https:// or http://")
    if timeout <= 0 or retries < 0 or backoff < 0 or (expected_size is not None and expected_size < 0):
        raise ValueError(
            f"timeout must be > 0, retries and backoff >= 0, expected_size >= 0 or None; "
            f"got timeout={timeout}, retries={retries}, backoff={backoff}, expected_size={expected_size}"
        )
    partial = Path(partial)
    if progress is None:
        progress = bool(sys.stderr is not None and sys.stderr.isatty())
    job = _Job(url, partial, expected_size, timeout, progress)
    owned = session is None
    session = requests.Session() if owned else session
    try:
        partial.parent.mkdir(parents=True, exist_ok=True)
        attempt = 0
        while True:
            try:
                return job.attempt(session)
            except _Retryable as failure:
                if attempt >= retries:
                    tries = "attempt" if attempt == 0 else "attempts"
                    kept = partial.stat().st_size if partial.exists() else 0
                    note = f" (the {kept} bytes in {partial} are kept, so the next try resumes)" if kept else ""
                    raise DownloadError(
                        f"could not download {url} after {attempt + 1} {tries}: {failure}; "
                        f"check the network and try again{note}"
                    ) from None
                pause = backoff * 2**attempt
                if failure.retry_after is not None:
                    pause = max(pause, min(failure.retry_after, _MAX_RETRY_AFTER))
                time.sleep(pause)
                attempt += 1
            except _ContentWrong as failure:
                note = f" (the partial file {partial} was deleted)" if partial.exists() else ""
                partial.unlink(missing_ok=True)
                raise DownloadError(f"{failure}{note}") from None
    except OSError as exc:
        raise DownloadError(
            f"cannot write {partial}: {exc.strerror or exc}; check that its directory is writable and has free space"
        ) from None
    finally:
        if owned:
            session.close()


class _Retryable(Exception):
    """One attempt failed in a way another attempt may not; the message is the cause."""

    def __init__(self, cause: str, retry_after: float | None = None) -> None:
        super().__init__(cause)
        self.retry_after = retry_after


class _ContentWrong(Exception):
    """The partial file cannot become the wanted file; the message says why."""


@dataclass
class _Job:
    url: str
    partial: Path
    expected_size: int | None
    timeout: float
    progress: bool

    def attempt(self, session: requests.Session) -> Digests:
        offset = self.partial.stat().st_size if self.partial.exists() else 0
        if self.expected_size is not None and offset > self.expected_size:
            offset = self._truncate()
        # At most two requests: a resume, then (if the server will not resume) one from byte zero.
        while True:
            headers = {"User-Agent": f"snzoo/{__version__}", "Accept-Encoding": "identity"}
            if offset:
                headers["Range"] = f"bytes={offset}-"
            try:
                with session.get(self.url, headers=headers, stream=True, timeout=(self.timeout, self.timeout)) as resp:
                    status = resp.status_code
                    if status == 416 and offset:
                        if self._already_complete(offset, resp):
                            return hash_file(self.partial)
                        offset = self._truncate()
                        continue
                    self._check_status(resp)
                    if status == 206:
                        start, total = _content_range(resp.headers.get("Content-Range"))
                        if start != offset:
                            if offset == 0:
                                raise _ContentWrong(
                                    f"{self.url} answers a plain request with a partial range "
                                    f"({resp.headers.get('Content-Range')!r}), so the file cannot be fetched "
                                    "from its start; use another source"
                                )
                            offset = self._truncate()
                            continue
                        return self._receive(resp, offset, total)
                    offset = 0  # a 200 carries the whole file, whatever was asked for
                    return self._receive(resp, 0, _content_length(resp))
            except requests.exceptions.SSLError as exc:
                raise DownloadError(
                    f"TLS error talking to {self.url}: {_short(exc)}; "
                    "check the system's certificates or use another source"
                ) from None
            except requests.exceptions.TooManyRedirects:
                raise DownloadError(f"{self.url} redirects in a loop; use another source") from None
            except (requests.exceptions.InvalidURL, requests.exceptions.InvalidSchema) as exc:
                raise DownloadError(f"cannot request {self.url}: {_short(exc)}; check the URL") from None
            except requests.exceptions.ConnectTimeout:
                raise _Retryable(f"no connection within {self.timeout:g} s") from None
            except (requests.exceptions.Timeout, requests.exceptions.ConnectionError) as exc:
                if _is_read_timeout(exc):
                    raise _Retryable(f"timed out after {self.timeout:g} s without data") from None
                raise _Retryable(f"connection failed: {_short(exc)}") from None
            except (requests.RequestException, urllib3.exceptions.HTTPError, http.client.HTTPException) as exc:
                raise _Retryable(f"transfer failed: {_short(exc)}") from None

    def _truncate(self) -> int:
        with open(self.partial, "wb"):
            pass
        return 0

    def _already_complete(self, offset: int, resp: requests.Response) -> bool:
        if self.expected_size is not None:
            return offset == self.expected_size
        total = _content_range_total(resp.headers.get("Content-Range"))
        return total is not None and total == offset

    def _check_status(self, resp: requests.Response) -> None:
        status = resp.status_code
        reason = resp.reason or _phrase(status)
        if status == 429 or status >= 500:
            raise _Retryable(f"HTTP {status} {reason}", _retry_after(resp))
        if status >= 400:
            if status in (401, 403):
                hint = "access is refused; the file is private or the link has expired; use another source"
            elif status in (404, 410):
                hint = "the file is not there; check the URL or use another source"
            else:
                hint = "the server refused the request; check the URL or use another source"
            raise DownloadError(f"HTTP {status} {reason} from {self.url}: {hint}")
        if status not in (200, 206):
            raise DownloadError(f"HTTP {status} {reason} from {self.url} carries no file; use another source")
        if resp.headers.get("Content-Type", "").split(";")[0].strip().lower() == "text/html":
            raise DownloadError(
                f"{self.url} answered with an HTML page instead of the file (a login, error or confirmation "
                "page); check the URL or use another source"
            )

    def _receive(self, resp: requests.Response, offset: int, total: int | None) -> Digests:
        """Stream the body after the first ``offset`` bytes of the partial; ``total`` is the whole file's size."""
        if total is not None and self.expected_size is not None and total != self.expected_size:
            raise _ContentWrong(
                f"{self.url} serves {total} bytes but {self.expected_size} are expected, so it holds a "
                "different file; check the URL and the expected size, or use another source"
            )
        body_length = _content_length(resp)
        sha, md5 = hashlib.sha256(), hashlib.md5()
        if offset:
            _feed(self.partial, sha, md5, limit=offset)
        received = 0
        bar_total = total if total is not None else (offset + body_length if body_length is not None else None)
        name = Path(urlsplit(self.url).path).name or self.partial.name
        with open(self.partial, "ab" if offset else "wb") as out, _bar(self.progress, bar_total, offset, name) as bar:
            try:
                for chunk in resp.iter_content(_STREAM_CHUNK):
                    out.write(chunk)
                    sha.update(chunk)
                    md5.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
                    if self.expected_size is not None and offset + received > self.expected_size:
                        raise _ContentWrong(
                            f"{self.url} sent more than the expected {self.expected_size} bytes, so it holds a "
                            "different file; check the URL and the expected size, or use another source"
                        )
            except (requests.RequestException, urllib3.exceptions.HTTPError, http.client.HTTPException) as exc:
                if _is_read_timeout(exc):
                    raise _Retryable(f"timed out after {self.timeout:g} s without data") from None
                of = f" of {offset + body_length}" if body_length is not None else ""
                raise _Retryable(f"connection dropped after {offset + received}{of} bytes{_os_reason(exc)}") from None
            out.flush()
            # The caller renames this file into place next; its bytes must be on disk before that.
            os.fsync(out.fileno())
        size = offset + received
        if body_length is not None and received < body_length:
            raise _Retryable(f"connection dropped after {size} of {offset + body_length} bytes")
        if self.expected_size is not None and size != self.expected_size:
            if body_length is None:
                # Without a length the end of the body cannot be told from a dropped connection.
                raise _Retryable(f"connection ended after {size} of {self.expected_size} bytes")
            raise _ContentWrong(
                f"{self.url} sent {size} bytes but {self.expected_size} are expected, so it holds a different "
                "file; check the URL and the expected size, or use another source"
            )
        return Digests(sha.hexdigest(), md5.hexdigest(), size)


def _bar(show: bool, total: int | None, initial: int, name: str):
    # Even a disabled tqdm starts its monitor thread, so none is made unless it will be seen.
    if not show:
        return NoProgressBar()
    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc=name,
                file=sys.stderr, leave=False)


def _feed(path: Path, sha, md5, limit: int | None = None) -> int:
    """Hash the first ``limit`` bytes of a file (all of it when None); the number of bytes hashed."""
    done = 0
    with open(path, "rb") as f:
        while limit is None or done < limit:
            chunk = f.read(_CHUNK if limit is None else min(_CHUNK, limit - done))
            if not chunk:
                break
            sha.update(chunk)
            md5.update(chunk)
            done += len(chunk)
    return done


_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)
_RANGE_TOTAL = re.compile(r"^\s*bytes\s+\*/(\d+)\s*$", re.IGNORECASE)


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """Start and total of a 206's Content-Range; (None, None) when it is missing or malformed."""
    match = _RANGE.match(value or "")
    if not match:
        return None, None
    total = None if match.group(3) == "*" else int(match.group(3))
    return int(match.group(1)), total


def _content_range_total(value: str | None) -> int | None:
    """The total of a 416's ``Content-Range: bytes */TOTAL``."""
    match = _RANGE_TOTAL.match(value or "")
    return int(match.group(1)) if match else None


def _content_length(resp: requests.Response) -> int | None:
    """The body's length on the wire, when it says and no encoding changes what is written."""
    if resp.headers.get("Content-Encoding", "identity").strip().lower() not in ("", "identity"):
        return None
    value = resp.headers.get("Content-Length", "")
    return int(value) if value.strip().isdigit() else None


def _retry_after(resp: requests.Response) -> float | None:
    value = resp.headers.get("Retry-After", "").strip()
    return float(value) if value.isdigit() else None


def _phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return ""


def _is_read_timeout(exc: BaseException) -> bool:
    # requests wraps a read timeout met while streaming the body in a ConnectionError.
    if isinstance(exc, (requests.exceptions.ReadTimeout, urllib3.exceptions.ReadTimeoutError)):
        return True
    return any(isinstance(arg, urllib3.exceptions.ReadTimeoutError) for arg in getattr(exc, "args", ()))


_ERRNO = re.compile(r"\[Errno -?\d+\] ([^'\")\]]+)")


def _os_reason(exc: BaseException) -> str:
    """`` (Connection reset by peer)`` and the like, when the error came from the socket; else empty."""
    match = _ERRNO.search(str(exc))
    return f" ({match.group(1).strip()})" if match else ""


def _short(exc: BaseException) -> str:
    """The telling part of a requests/urllib3 error, whose own text nests several layers of repr."""
    text = str(exc)
    match = _ERRNO.search(text)
    if match:
        return match.group(1).strip()
    return first_line(exc)
