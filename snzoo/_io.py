"""Small helpers every concern shares: atomic file writes, one-line error text, environment flags."""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import Iterator, Union

from snzoo.errors import OutputError, SnzooError

PathLike = Union[str, "os.PathLike[str]"]

_TRUE = ("1", "true", "yes", "on")


@contextlib.contextmanager
def atomic_path(path: PathLike, *, make_parents: bool = True) -> Iterator[Path]:
    """A temporary path beside `path` that replaces it when the block ends without an error.

    On an error the temporary file is removed and `path` is left as it was, so a reader never sees a
    half-written file; an OSError (a missing or read-only folder, a full disk, a file where a folder should be)
    becomes one OutputError line. The temporary name is unique per process and call; the caller creates it
    (not mkstemp, whose 0600 mode would survive the rename).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        if make_parents:
            path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except SnzooError:
        tmp.unlink(missing_ok=True)
        raise
    except OSError as exc:
        with contextlib.suppress(OSError):  # not there when the folder itself could not be made
            tmp.unlink(missing_ok=True)
        raise OutputError.cannot_write(path, exc) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_output_path(path: PathLike, what: str = "output path") -> Path:
    """`path` as a Path, or OutputError when a file stands where one of its folders would have to be made."""
    path = Path(path)
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"cannot write {path}: {ancestor} is a file, not a folder; choose another {what}")
    return path


def atomic_write_text(path: PathLike, text: str, *, fsync: bool = False) -> Path:
    """Write UTF-8 text to `path` through a temporary file renamed into place; fsync before the rename if asked."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
    return path


def first_line(exc: BaseException, limit: int = 200, *, with_type: bool = False) -> str:
    """The first non-empty line of an exception's message (its type name when it has none), cut to `limit`."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    text = lines[0][:limit]
    return f"{type(exc).__name__}: {text}" if with_type else text


def env_flag(name: str) -> bool:
    """True when the environment variable is set to 1, true, yes or on (any case)."""
    return os.environ.get(name, "").strip().lower() in _TRUE


class NoProgressBar:
    """Stands in for a tqdm bar that is not shown (even a disabled tqdm starts a monitor thread)."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "NoProgressBar":
        return self

    def __exit__(self, *exc) -> None:
        pass
