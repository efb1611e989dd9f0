"""Errors that reach users: each carries one line saying what is wrong and how to fix it."""

from __future__ import annotations


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
