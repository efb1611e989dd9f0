"""Results files of evaluations with timm's column names: one row per model, appended atomically."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Sequence, Union

from snzoo._io import atomic_write_text
from snzoo.errors import DataError, OutputError
from snzoo.eval.engine import EvalResult

RESULT_COLUMNS = ["model", "top1", "top1_err", "top5", "top5_err", "param_count", "img_size", "crop_pct",
                  "interpolation", "n", "images_per_s", "checkpoint_sha256"]


def result_row(result: EvalResult) -> dict:
    """One results-file row with timm's column names (param_count in millions) plus n, images/s, sha256."""
    return {
        "model": result.model,
        "top1": round(result.top1, 3),
        "top1_err": round(100.0 - result.top1, 3),
        "top5": round(result.top5, 3),
        "top5_err": round(100.0 - result.top5, 3),
        "param_count": round(result.param_count / 1e6, 2) if result.param_count else None,
        "img_size": result.config.get("crop"),
        "crop_pct": result.config.get("crop_pct"),
        "interpolation": result.config.get("interpolation"),
        "n": result.n,
        "images_per_s": round(result.images_per_s, 2),
        "checkpoint_sha256": result.checkpoint_sha256,
    }


def append_results(path: Union[str, os.PathLike], results: Sequence[EvalResult]) -> Path:
    """Append rows to a .csv (header written once) or .json (a list) results file, replacing it atomically."""
    return append_rows(path, [result_row(r) for r in results], RESULT_COLUMNS)


def append_rows(path: Union[str, os.PathLike], rows: Sequence[dict], columns: Sequence[str]) -> Path:
    """Append rows with these columns to a .csv (header written once) or .json (a list) results file, atomically."""
    path = check_results_file(path)
    columns = list(columns)
    if path.suffix.lower() == ".json":
        try:
            existing = json.loads(path.read_text()) if path.exists() and path.stat().st_size else []
        except ValueError:
            existing = None
        if not isinstance(existing, list):
            raise DataError(f"results file {path} does not hold a JSON list; choose another file")
        return atomic_write_text(path, json.dumps(existing + rows, indent=2) + "\n")
    previous = path.read_text() if path.exists() else ""
    if previous and previous.splitlines()[0].split(",") != columns:
        raise DataError(f"results file {path} has other columns than {','.join(columns)}; choose another file")
    text = io.StringIO(newline="")
    text.write(previous)
    writer = csv.DictWriter(text, fieldnames=columns)
    if not previous:
        writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, text.getvalue())


def check_results_file(path: Union[str, os.PathLike]) -> Path:
    """The results file as a Path, or DataError / OutputError when rows could not be appended to it; checked
    before an evaluation too, so its time is not lost to a bad file name."""
    path = Path(path)
    if path.suffix.lower() not in (".csv", ".json"):
        raise DataError(f"results file {path} must end in .csv or .json")
    if path.is_dir():
        raise OutputError(f"cannot write {path}: it is a folder; give the path of a .csv or .json file")
    if not path.parent.is_dir():
        what = "is a file, not a folder" if path.parent.exists() else "does not exist"
        raise OutputError(f"cannot write {path}: {path.parent} {what}; choose another results file")
    return path
