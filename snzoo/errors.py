"""Every error snzoo raises for bad input; each carries one line saying what is wrong and how to fix it.

The CLI prints any SnzooError as one `error:` line with a non-zero exit code. The second base class of each
error is the built-in exception a caller would catch without knowing snzoo (KeyError, ValueError, OSError...).
"""

from __future__ import annotations

from pathlib import Path


class SnzooError(Exception):
    """Base class of every error snzoo raises for bad input; the CLI prints its message as one line."""


# ------------------------------------------------------------------------------------------ names and zoo


class UnknownModelError(SnzooError, KeyError):
    """A model or zoo entry name that the registry does not know."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class ManifestError(SnzooError, ValueError):
    """A weights manifest (the shipped one or a user overlay) that breaks the schema."""


class ModelConfigError(SnzooError, ValueError):
    """A model folder whose config.json is missing, unreadable or has a field snzoo cannot use, or a task model's
    argument that cannot be used (a backbone that is not an SN ResNet, an unknown head, an output stride, a
    frozen-stage count)."""


# ------------------------------------------------------------------------------------------------ weights


class CheckpointError(SnzooError, ValueError):
    """A checkpoint file that cannot be read safely or does not match the architecture."""


class ChecksumError(SnzooError):
    """A file whose bytes are not the ones the manifest pins."""


class DownloadError(SnzooError):
    """A download that failed: network, HTTP status, or content that is not the file."""


class WeightsNotAvailableError(SnzooError, FileNotFoundError):
    """Pretrained weights that are neither cached nor obtainable right now."""


class UnpinnedWeightsWarning(UserWarning):
    """Weights were accepted without a published checksum to compare with."""


# --------------------------------------------------------------------------------------- data, eval, train


class DataError(SnzooError, ValueError):
    """A dataset path, layout or option that cannot be used."""


class BadImageError(DataError):
    """An image file that cannot be decoded."""


class RecipeError(SnzooError, ValueError):
    """A training recipe (or an override of one) with a missing, unknown or invalid field."""


class TrainingError(SnzooError, RuntimeError):
    """A run that cannot go on (non-finite loss, impossible batch plan, nothing to resume)."""


class MetricsLogError(SnzooError, ValueError):
    """A value that cannot be logged as a metric, or a metrics file that cannot be read."""


# ---------------------------------------------------------------------------------------- kernels, tools


class KernelBuildError(SnzooError, RuntimeError):
    """snzoo's SN CPU kernel cannot be built or loaded here (SN layers still run, on PyTorch ops)."""


class KernelInputError(SnzooError, ValueError):
    """Input a Triton SN kernel cannot take (device, dtype or shape)."""


class ExportError(SnzooError, RuntimeError):
    """An export that cannot be made: bad settings, a destination in the way, a missing package, or an
    exporter failure."""


class BenchmarkError(SnzooError, ValueError):
    """Benchmark settings that cannot be run."""


class PlotError(SnzooError, ValueError):
    """Nothing to plot, or a plot that cannot be written."""


# ------------------------------------------------------------------------------------------ outputs, devices


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


# ------------------------------------------------------------------------------------------ integrations


class IntegrationImportError(SnzooError, ImportError):
    """An integration (snzoo.integrations.timm) imported, or a feature needing an optional library used (COCO data
    and metrics: pycocotools), where that library is not installed."""


class IntegrationArgumentError(SnzooError, TypeError):
    """An argument of a third-party API (timm.create_model's kwargs) that snzoo's models cannot honour."""


__all__ = ["BadImageError", "BenchmarkError", "CheckpointError", "ChecksumError", "DataError", "DeviceError", "DownloadError", "ExportError", "IntegrationArgumentError", "IntegrationImportError", "KernelBuildError", "KernelInputError", "ManifestError", "MetricsLogError", "ModelConfigError", "OutputError", "PlotError", "RecipeError", "SnzooError", "TrainingError", "UnknownModelError", "UnpinnedWeightsWarning", "WeightsNotAvailableError"]
