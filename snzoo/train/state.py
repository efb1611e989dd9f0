"""Run checkpoints: everything a resumed run needs, written atomically."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Optional

import torch

from snzoo._io import atomic_path
from snzoo.errors import CheckpointError

STATE_FILE = "state.pt"


def rng_states() -> dict:
    """The random number generator states a run consumes (CPU, CUDA, Python)."""
    states = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_state(run_dir: Path, **state: Any) -> Path:
    """Write run_dir/state.pt through a temporary file, so a killed process leaves the previous one intact."""
    path = Path(run_dir) / STATE_FILE
    with atomic_path(path) as tmp:
        torch.save(dict(state, rng=rng_states()), tmp)
    return path


def load_state(run_dir: Path) -> Optional[dict]:
    """The last run checkpoint (read with weights_only=True), or None when there is none."""
    path = Path(run_dir) / STATE_FILE
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable state is the same problem for the user
        raise CheckpointError(f"{path}: cannot resume from it ({type(exc).__name__}); start a new run directory") from None
