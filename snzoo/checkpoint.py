"""Reading checkpoints safely and loading them into models with a readable report of any mismatch."""

from __future__ import annotations

import os
import pickle
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Iterable, Union

import torch
from torch import Tensor, nn

from snzoo.errors import CheckpointError

PathLike = Union[str, Path]
CLASSIFIER_PREFIX = "fc."


CHECKPOINT_SUFFIXES = (".pth", ".pt", ".tar", ".ckpt", ".bin", ".safetensors")


def names_a_file(target: str) -> bool:
    """True when a name-or-path argument can only mean a file (a folder in it, or a checkpoint suffix), so a
    missing one is reported as a missing file rather than as an unknown zoo entry."""
    return Path(target).exists() or "/" in target or os.sep in target or target.endswith(CHECKPOINT_SUFFIXES)


def is_safetensors_file(path: PathLike) -> bool:
    """True when the file starts like safetensors: an 8-byte header length, then a JSON object."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 0 < header_len < 100_000_000


def _numpy_safe_globals() -> list:
    # Training scripts often stored accuracies as NumPy scalars; rebuilding those runs no user code.
    try:
        import numpy as np
    except ImportError:
        return []
    core = getattr(np, "_core", None) or np.core
    return [core.multiarray.scalar, np.dtype, type(np.dtype("float64")), type(np.dtype("float32"))]


def read_state_dict(path: PathLike) -> dict[str, Tensor]:
    """The state dict of a checkpoint file, with any 'module.' prefix removed.

    Accepts safetensors, the original release's format (a pickled dict with 'state_dict', 'optimizer',
    'epoch', ...) and a bare state dict. Pickles are read with torch.load(weights_only=True): a file that
    needs anything beyond tensors and plain containers is refused without running it.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a file")
    if path.suffix == ".safetensors" or is_safetensors_file(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return strip_prefix(load_file(str(path)))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({_first_line(exc)})") from None
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = _weights_only_reason(exc)
        if "global" not in reason.lower():
            raise CheckpointError(_unreadable_message(path, exc, reason)) from None
        raise CheckpointError(
            f"{path}: refused: the pickle holds objects other than tensors and plain containers, which could run "
            f"code ({reason}); convert it where you trust it, or use a safetensors file"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, struct.error) as exc:
        raise CheckpointError(_unreadable_message(path, exc)) from None
    return strip_prefix(extract_state_dict(obj, path))


def _weights_only_reason(exc: BaseException) -> str:
    """The line of torch's long weights_only message that names the cause."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "global" in line.lower() or "Unsupported operand" in line:
            return line[:200]
    return _first_line(exc, 120)


def _unreadable_message(path: Path, exc: BaseException, reason: str = "") -> str:
    with open(path, "rb") as f:
        head = f.read(64).lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")):
        return f"{path}: cannot be read as a PyTorch checkpoint: it is an HTML page (a download that got a web page instead of the file)"
    return (
        f"{path}: cannot be read as a PyTorch checkpoint ({type(exc).__name__}: {reason or _first_line(exc, 120)}); "
        "the file may be truncated or not a checkpoint"
    )


def extract_state_dict(obj: object, path: PathLike = "checkpoint") -> dict[str, Tensor]:
    """The tensors of a loaded checkpoint: obj['state_dict'], obj['model'] when it is a dict, or obj itself."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict or a dict with 'state_dict'")
    for key in ("state_dict", "model"):
        inner = obj.get(key)
        if isinstance(inner, Mapping):
            obj = inner
            break
    tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if not tensors or len(tensors) != len(obj):
        keys = ", ".join(sorted(map(str, obj))[:8])
        raise CheckpointError(f"{path}: no state dict found (top-level keys: {keys}); expected tensors or 'state_dict'")
    return tensors


def strip_prefix(state_dict: Mapping[str, Tensor], prefix: str = "module.") -> dict[str, Tensor]:
    """Remove the DataParallel / DistributedDataParallel prefix from every key that has it."""
    return {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in state_dict.items()}


def _first_line(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:limit]


def _sample(keys: Iterable[str], limit: int = 4) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", +{len(keys) - limit} more" if len(keys) > limit else "")


def _shape(t: Tensor) -> str:
    return "x".join(map(str, t.shape)) or "scalar"


def compare_state_dict(
    model: nn.Module, state_dict: Mapping[str, Tensor], skip_classifier: bool = False
) -> tuple[list[str], list[str], list[str]]:
    """Keys the checkpoint lacks, keys the model lacks, and keys whose shapes differ."""
    expected = model.state_dict()
    keep = (lambda k: not k.startswith(CLASSIFIER_PREFIX)) if skip_classifier else (lambda k: True)
    missing = [k for k in expected if keep(k) and k not in state_dict]
    unexpected = [k for k in state_dict if keep(k) and k not in expected]
    mismatched = [
        k for k in expected if keep(k) and k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    return missing, unexpected, mismatched


def first_non_finite(state_dict: Mapping[str, Tensor]) -> str | None:
    """The first key whose floating-point tensor holds NaN or inf, or None when every value is finite."""
    for key, tensor in state_dict.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return key
    return None


def check_finite(state_dict: Mapping[str, Tensor], source: str = "checkpoint") -> None:
    """Raise CheckpointError naming the first floating-point tensor with NaN or inf values."""
    key = first_non_finite(state_dict)
    if key is not None:
        raise CheckpointError(f"{source}: tensor {key} has non-finite values (NaN/inf); the checkpoint is corrupt")


def check_values(
    model: nn.Module, state_dict: Mapping[str, Tensor], source: str = "checkpoint", skip_classifier: bool = False
) -> None:
    """Raise CheckpointError for the first tensor whose dtype or values the model cannot take.

    load_state_dict would silently cast integers into a floating-point parameter and copy NaN weights, so a
    broken export would only show as garbage predictions. Integer buffers (num_batches_tracked) stay legal.
    """
    expected = model.state_dict()
    kept = {k: v for k, v in state_dict.items() if not (skip_classifier and k.startswith(CLASSIFIER_PREFIX))}
    for key, tensor in kept.items():
        target = expected.get(key)
        if target is not None and target.is_floating_point() and not tensor.is_floating_point():
            raise CheckpointError(
                f"{source}: tensor {key} is {str(tensor.dtype).removeprefix('torch.')} but the model holds it as "
                f"floating point; the checkpoint is corrupt or was saved with the wrong dtype"
            )
    check_finite(kept, source)


def _hint(model: nn.Module, state_dict: Mapping[str, Tensor], missing, unexpected, mismatched) -> str:
    expected = model.state_dict()
    if any(k.endswith(("mean_weight", "var_weight")) for k in mismatched) or (
        missing and all(k.endswith(("running_mean", "running_var")) for k in missing) and not unexpected
    ):
        return "; the checkpoint's SN layers differ in using_bn (pass using_bn=False for [IN, LN] checkpoints)"
    if mismatched and all(k.startswith(CLASSIFIER_PREFIX) for k in mismatched):
        n = state_dict["fc.weight"].shape[0] if "fc.weight" in state_dict else "?"
        return f"; the checkpoint has {n} classes, the model {expected['fc.weight'].shape[0]}: pass num_classes"
    if any(k.endswith(("mean_fixed", "var_fixed", "radius")) for k in list(missing) + list(unexpected)):
        return "; SN and SSN checkpoints differ (SSN layers carry mean_fixed, var_fixed and radius)"
    return ""


def load_checked(
    model: nn.Module, state_dict: Mapping[str, Tensor], source: str = "checkpoint", skip_classifier: bool = False
) -> None:
    """Load a state dict after checking every key, shape and dtype, and that its values are finite; one error
    line describes any difference.

    skip_classifier leaves the model's own (freshly initialised) classifier in place.
    """
    missing, unexpected, mismatched = compare_state_dict(model, state_dict, skip_classifier)
    if missing or unexpected or mismatched:
        expected = model.state_dict()
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({_sample(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_sample(unexpected)})")
        if mismatched:
            shapes = [f"{k}: checkpoint {_shape(state_dict[k])} vs model {_shape(expected[k])}" for k in mismatched]
            parts.append(f"{len(mismatched)} shape mismatches ({_sample(shapes, 3)})")
        name = getattr(model, "architecture", type(model).__name__)
        hint = _hint(model, state_dict, missing, unexpected, mismatched)
        raise CheckpointError(f"{source} does not match {name}: {'; '.join(parts)}{hint}")
    check_values(model, state_dict, source, skip_classifier)
    if skip_classifier:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(CLASSIFIER_PREFIX)}
    model.load_state_dict(state_dict, strict=not skip_classifier)
