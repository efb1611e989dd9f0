"""Reading checkpoint files into state dicts safely: safetensors, the original format, bare state dicts."""

from __future__ import annotations

import os
import pickle
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from snzoo._io import PathLike, first_line
from snzoo.errors import CheckpointError
from snzoo.weights.layouts import DETECTRON, detectron_to_snzoo, is_detectron_layout


CHECKPOINT_SUFFIXES = (".pth", ".pt", ".tar", ".ckpt", ".bin", ".safetensors")
# Model names that hold a slash without being files: Hugging Face model folders (snzoo.create_model reads them).
MODEL_FOLDER_PREFIXES = ("hf-hub:", "local-dir:")


def names_a_file(target: str) -> bool:
    """True when a name-or-path argument can only mean a file (a folder in it, or a checkpoint suffix), so a
    missing one is reported as a missing file rather than as an unknown zoo entry. `hf-hub:` and `local-dir:`
    names are model names, never files."""
    if target.startswith(MODEL_FOLDER_PREFIXES):
        return False
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


def read_state_dict(path: PathLike, layout: str | None = None) -> dict[str, Tensor]:
    """The state dict of a checkpoint file in snzoo's key layout, with any 'module.' prefix removed.

    Accepts safetensors, the original release's format (a pickled dict with 'state_dict', 'optimizer',
    'epoch', ...), a bare state dict and Detectron.pytorch backbones ({'model': ...}, keys under 'Conv_Body.'),
    whose keys are renamed (snzoo.weights.layouts). layout None detects the Detectron layout; "detectron"
    requires it. Pickles are read with torch.load(weights_only=True): a file that needs anything beyond tensors
    and plain containers is refused without running it.
    """
    if layout not in (None, DETECTRON):
        raise ValueError(f"layout {layout!r} is not known (expected None or {DETECTRON!r})")
    state_dict = _read_raw(Path(path))
    if is_detectron_layout(state_dict):
        return detectron_to_snzoo(state_dict, str(path))
    if layout == DETECTRON:
        raise CheckpointError(
            f"{path}: not a Detectron.pytorch backbone (no key starts with 'Conv_Body.'; first key "
            f"{next(iter(state_dict), 'none')!r}), though that layout was expected")
    return state_dict


def _read_raw(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a file")
    if path.suffix == ".safetensors" or is_safetensors_file(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return strip_prefix(load_file(str(path)))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({first_line(exc)})") from None
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
    return first_line(exc, 120)


def _unreadable_message(path: Path, exc: BaseException, reason: str = "") -> str:
    with open(path, "rb") as f:
        head = f.read(64).lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")):
        return f"{path}: cannot be read as a PyTorch checkpoint: it is an HTML page (a download that got a web page instead of the file)"
    return (
        f"{path}: cannot be read as a PyTorch checkpoint ({type(exc).__name__}: {reason or first_line(exc, 120)}); "
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
