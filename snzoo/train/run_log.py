"""The metrics log of a training run: one JSON object per line in metrics.jsonl, mirrored to TensorBoard.

metrics.jsonl is the durable record: every line is flushed as it is written, so a killed run keeps
everything it logged, and a resumed run appends to the same file. TensorBoard event files (under
run_dir/tensorboard) are a convenience copy for watching a run live.

Each line holds {"step", "split", "time", ["epoch",] scalars...}; `time` is Unix time in seconds.
Non-finite values (a diverged loss) are written as null, because NaN and Infinity are not JSON.
Importance lines have split "importance" and carry {"layers": {layer name: {"terms", "mean", "var"}}}.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from numbers import Real
from pathlib import Path
from typing import Any, Optional

from torch import Tensor, nn

from snzoo._io import PathLike, atomic_write_text
from snzoo.errors import MetricsLogError
from snzoo.nn.importance import importance_weights

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
IMPORTANCE_SPLIT = "importance"
_RESERVED = ("step", "split", "time", "layers")


def _scalar(name: str, value: Any) -> float | int:
    """A plain Python number from a float, int, NumPy scalar or one-element tensor."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"metric {name!r} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    elif hasattr(value, "item") and not isinstance(value, (int, float)):
        value = value.item()  # NumPy scalars
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"metric {name!r} must be a number, got {type(value).__name__}")
    return value if isinstance(value, int) else float(value)


def _json_value(value: float | int) -> Optional[float | int]:
    return value if isinstance(value, int) or math.isfinite(value) else None


class RunLogger:
    """Appends metrics to run_dir/metrics.jsonl and mirrors them to TensorBoard.

    Only `rank` 0 writes; on other ranks every method does nothing, so a distributed loop can call it
    everywhere. tensorboard=False, or TensorBoard not installed, keeps only the JSON log.
    purge_step: when a run resumes from a checkpoint taken at this step, the lines logged after it by the
    interrupted run are dropped (from metrics.jsonl and, through SummaryWriter's purge_step, from the
    TensorBoard view), so no step appears twice.
    """

    def __init__(
        self, run_dir: PathLike, rank: int = 0, tensorboard: bool = True, purge_step: Optional[int] = None
    ) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = rank == 0
        self._file = None
        self._writer = None
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / METRICS_FILE
        if purge_step is not None and path.exists():
            _drop_from_step(path, purge_step)
        _end_partial_line(path)
        self._file = open(path, "a", encoding="utf-8")
        if tensorboard:
            self._writer = _summary_writer(self.run_dir / TENSORBOARD_DIR, purge_step)

    @property
    def metrics_path(self) -> Path:
        """The JSON-lines file this logger appends to."""
        return self.run_dir / METRICS_FILE

    @property
    def tensorboard_enabled(self) -> bool:
        """Whether scalars are also written as TensorBoard events."""
        return self._writer is not None

    def log(self, step: int, split: str, epoch: Optional[int] = None, **scalars: Any) -> None:
        """Write one record {"step", "epoch" (if given), "split", "time", scalars...} and flush it."""
        if not self.enabled:
            return
        clash = [k for k in scalars if k in _RESERVED]
        if clash:
            raise ValueError(f"metric names {clash} are reserved in the log record; rename them")
        values = {name: _scalar(name, v) for name, v in scalars.items()}
        record: dict[str, Any] = {"step": int(step)}
        if epoch is not None:
            record["epoch"] = int(epoch)
        record.update(split=str(split), time=time.time())
        record.update({name: _json_value(v) for name, v in values.items()})
        self._write(record)
        if self._writer is not None:
            for name, value in values.items():
                self._writer.add_scalar(f"{split}/{name}", value, int(step))

    def log_importance(self, step: int, model: nn.Module, epoch: Optional[int] = None) -> None:
        """Record the importance weights (mixing probabilities) of every SN layer as one "importance" line.

        TensorBoard gets one scalar per layer, statistic and term, tagged "importance/LAYER.mean.in".
        """
        if not self.enabled:
            return
        layers = importance_weights(model)
        record: dict[str, Any] = {"step": int(step)}
        if epoch is not None:
            record["epoch"] = int(epoch)
        record.update(split=IMPORTANCE_SPLIT, time=time.time(), layers=layers)
        self._write(record)
        if self._writer is not None:
            for name, layer in layers.items():
                for stat in ("mean", "var"):
                    for term, p in zip(layer["terms"], layer[stat]):
                        self._writer.add_scalar(f"{IMPORTANCE_SPLIT}/{name}.{stat}.{term}", p, int(step))

    def _write(self, record: dict) -> None:
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        # Flushed per line so that a killed run loses nothing it has logged.
        self._file.flush()

    def flush(self) -> None:
        """Push buffered TensorBoard events to disk (the JSON log is flushed on every line)."""
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Close the log and the TensorBoard writer; later calls to log do nothing."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._file is not None:
            self._file.close()
            self._file = None
        self.enabled = False

    def __enter__(self) -> "RunLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _summary_writer(log_dir: Path, purge_step: Optional[int]):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        warnings.warn("TensorBoard is not installed; metrics go to metrics.jsonl only (pip install tensorboard)")
        return None
    # A short flush interval keeps the live view close to the JSON log.
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step, flush_secs=30)


def _end_partial_line(path: Path) -> None:
    """Terminate a line a killed run left unfinished, so the next record starts on a line of its own."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) != b"\n":
            f.write(b"\n")


def _drop_from_step(path: Path, purge_step: int) -> None:
    """Rewrite the log without the records at or after purge_step (temp file + rename: never half-written)."""
    kept = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            record = _parse(line)
            if record is not None and int(record.get("step", 0)) < purge_step:
                kept.append(line if line.endswith("\n") else line + "\n")
    atomic_write_text(path, "".join(kept), fsync=True)


def _parse(line: str) -> Optional[dict]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def read_metrics(run_dir: PathLike) -> list[dict]:
    """The records of run_dir/metrics.jsonl (or of the .jsonl file given), in the order they were written.

    A line cut short by a killed process is skipped: the last line, or a line a resumed run ended (one
    that starts like a record but does not parse). Anything else that is not a record is an error.
    """
    path = Path(run_dir)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise MetricsLogError(f"{path} does not exist; a run directory holds {METRICS_FILE}")
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().split("\n")
    last = max((i for i, line in enumerate(lines, 1) if line.strip()), default=0)
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        record = _parse(line)
        if record is None:
            if number == last or line.lstrip().startswith("{"):
                continue  # cut short by a killed process
            raise MetricsLogError(f"{path}:{number}: not a JSON record; is this a {METRICS_FILE} written by RunLogger?")
        if "step" not in record or "split" not in record:
            raise MetricsLogError(f"{path}:{number}: a record without 'step' and 'split'")
        records.append(record)
    return records
