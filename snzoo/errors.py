"""Errors that reach users: each carries one line saying what is wrong and how to fix it."""

from __future__ import annotations

from pathlib import Path


class SnzooError(Exception):
    """Base class of every error snzoo raises for bad input; the CLI prints its message as one line."""


class UnknownModelError(SnzooError, KeyError):
    """A model or zoo entry name that the registry does not know."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class ManifestError(SnzooError, ValueError):
    """A weights manifest (the shipped one or a user overlay) that breaks the schema."""


class CheckpointError(SnzooError, ValueError):
    """A checkpoint file that cannot be read safely or does not match the architecture."""


class WeightsNotAvailableError(SnzooError, FileNotFoundError):
    """Pretrained weights that are neither cached nor obtainable right now."""


class KernelBuildError(SnzooError, RuntimeError):
    """snzoo's SN CPU kernel cannot be built or loaded here (SN layers still run, on PyTorch ops)."""


class TrainingError(SnzooError, RuntimeError):
    """A run that cannot go on (non-finite loss, impossible batch plan, nothing to resume)."""


class OutputError(SnzooError, OSError):
    """An output path that cannot be written: its folder is missing or read-only, or a file stands in the way."""

    @classmethod
    def cannot_write(cls, path, exc: OSError) -> "OutputError":
        # mkdir under a file says "File exists" or "Not a directory"; naming the file says what is in the way.
        blocker = next((p for p in Path(path).parents if p.exists()), None)
        if blocker is not None and not blocker.is_dir():
            reason = f"{blocker} is a file, not a folder"
        else:
            reason = exc.strerror or str(exc)  # str(exc) would repeat the path
        return cls(f"cannot write {path}: {reason}; choose an output path in a writable folder")


class DeviceError(SnzooError, ValueError):
    """A --device that names no device type, or a GPU this machine does not have."""
