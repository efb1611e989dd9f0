"""The robustness suite: every test set found under one folder, and timm-style results files with the
differences to the set each is compared with (ImageNet val for ReaL, ImageNetV2 and Sketch; the "clean" ImageNet
val restricted to the same 200 classes for ImageNet-R and ImageNet-A)."""

from __future__ import annotations

import csv
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from snzoo._io import atomic_write_text
from snzoo.errors import DataError, WeightsNotAvailableError
from snzoo.eval.engine import EvalResult
from snzoo.eval.results import RESULT_COLUMNS, result_row
from snzoo.eval.runner import classes_present, evaluate_model
from snzoo.data import build_eval_dataset, imagenet_classes

DIFF_COLUMNS = ["top1_diff", "top5_diff", "rank_diff"]
_IMAGENET = ("imagenet", "imagenet-val", "val", "ILSVRC2012_img_val.tar")


@dataclass(frozen=True)
class TestSet:
    """One results file of the suite: where its data lies under the root, and what its diffs compare with."""

    key: str  # results-{key}.csv
    folders: tuple[str, ...]  # names looked for under the root, first found wins
    base: Optional[str] = None  # the key the diffs are taken against
    classes_of: Optional[str] = None  # ImageNet val restricted to this set's classes ("clean")
    classes_in_data: bool = False


ROBUSTNESS = (
    TestSet("imagenet", _IMAGENET),
    TestSet("imagenet-real", _IMAGENET, base="imagenet"),
    TestSet("imagenetv2-matched-frequency", ("imagenetv2-matched-frequency",
                                             "imagenetv2-matched-frequency-format-val"), base="imagenet"),
    TestSet("sketch", ("imagenet-sketch", "sketch"), base="imagenet"),
    TestSet("imagenet-r-clean", _IMAGENET, classes_of="imagenet-r"),
    TestSet("imagenet-r", ("imagenet-r",), base="imagenet-r-clean", classes_in_data=True),
    TestSet("imagenet-a-clean", _IMAGENET, classes_of="imagenet-a"),
    TestSet("imagenet-a", ("imagenet-a",), base="imagenet-a-clean", classes_in_data=True),
)
SUITES = {"robustness": ROBUSTNESS}


def find_sets(root: Union[str, os.PathLike], sets: Sequence[TestSet] = ROBUSTNESS) -> dict[str, Path]:
    """The data of each set found under root, by key (a set whose folder is missing is left out)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"--data-root {root} is not a folder; expected a folder holding imagenet/, imagenet-r/, ...")
    found = {}
    for test_set in sets:
        path = next((root / name for name in test_set.folders if (root / name).exists()), None)
        if path is not None:
            found[test_set.key] = path
    for test_set in sets:  # a clean baseline needs the set it is the baseline of
        if test_set.classes_of and test_set.classes_of not in found:
            found.pop(test_set.key, None)
    if not found:
        names = sorted({name for s in sets for name in s.folders})
        raise DataError(f"no test set found under {root}; expected folders named {', '.join(names)}")
    return found


def _classes_of(path: Path) -> list[int]:
    return classes_present(build_eval_dataset(path, None, class_names=imagenet_classes()))


def _real_labels(root: Path) -> Union[bool, Path, None]:
    # A real.json beside the sets is used as is; else the published one from the cache, fetched if need be.
    return root / "real.json" if (root / "real.json").is_file() else True


def run_suite(names: Sequence[str], root: Union[str, os.PathLike], *, suite: str = "robustness",
              report: Optional[Callable[[str, EvalResult], None]] = None,
              **options) -> dict[str, list[EvalResult]]:
    """Evaluate every model of `names` on every set of the suite found under root; returns the results by key.

    options go to `evaluate_model` (checkpoint, arch, batch_size, workers, device, ...); report(key, result)
    is called after each evaluation. ImageNet-ReaL rows come from the ImageNet run (its `real` numbers); when
    the ReaL labels cannot be had (offline and not cached), that set is left out with a warning.
    """
    if suite not in SUITES:
        raise DataError(f"unknown suite {suite!r}; expected one of {', '.join(SUITES)}")
    root = Path(root)
    sets = SUITES[suite]
    found = find_sets(root, sets)
    results: dict[str, list[EvalResult]] = {key: [] for key in found}
    classes = {s.classes_of: _classes_of(found[s.classes_of]) for s in sets if s.key in found and s.classes_of}
    for name in names:
        for test_set in sets:
            if test_set.key not in found or test_set.key == "imagenet-real":
                continue
            extra: dict = {}
            if test_set.key == "imagenet" and "imagenet-real" in found:
                extra["real_labels"] = _real_labels(root)
            if test_set.classes_of:
                extra["only_classes"] = classes[test_set.classes_of]
            try:
                result = evaluate_model(name, data=found[test_set.key], classes_in_data=test_set.classes_in_data,
                                        **extra, **options)
            except WeightsNotAvailableError as exc:
                if "real_labels" not in extra or "ReaL" not in str(exc):
                    raise
                warnings.warn(f"ImageNet-ReaL left out: {exc}", stacklevel=2)
                found.pop("imagenet-real")
                results.pop("imagenet-real")
                result = evaluate_model(name, data=found[test_set.key], **options)
            results[test_set.key].append(result)
            if report:
                report(test_set.key, result)
            if result.real is not None and "imagenet-real" in results:
                results["imagenet-real"].append(_real_result(result))
                if report:
                    report("imagenet-real", results["imagenet-real"][-1])
    return results


def _real_result(result: EvalResult) -> EvalResult:
    real = result.real
    return EvalResult(model=result.model, top1=real["top1"], top5=real["top5"], n=real["n"],
                      correct1=real["correct1"], correct5=real["correct5"], seconds=result.seconds, images_per_s=result.images_per_s,
                      config=dict(result.config), param_count=result.param_count,
                      checkpoint_sha256=result.checkpoint_sha256)


def _sorted_rows(results: Sequence[EvalResult]) -> list[dict]:
    rows = [result_row(r) for r in results]
    return sorted(rows, key=lambda row: (-row["top1"], -row["top5"], row["model"]))


def _signed(value: float) -> str:
    return f"+{value:.3f}" if value >= 0 else f"-{abs(value):.3f}"


def with_diffs(rows: list[dict], base_rows: list[dict]) -> list[dict]:
    """timm's diff columns: top-1 / top-5 differences to the base set and the change of rank among the models."""
    base_rank = {row["model"]: rank for rank, row in enumerate(base_rows)}
    base = {row["model"]: row for row in base_rows}
    out = []
    for rank, row in enumerate(rows):
        b = base.get(row["model"])
        if b is None:
            out.append({**row, "top1_diff": "", "top5_diff": "", "rank_diff": ""})
            continue
        move = base_rank[row["model"]] - rank
        out.append({**row, "top1_diff": _signed(row["top1"] - b["top1"]), "top5_diff": _signed(row["top5"] - b["top5"]),
                    "rank_diff": f"+{move}" if move > 0 else str(move)})
    return out


def write_suite_results(results: dict[str, list[EvalResult]], out_dir: Union[str, os.PathLike],
                        suite: str = "robustness") -> list[Path]:
    """Write results-{key}.csv for every set evaluated, rows best first, with diffs where the set has a base."""
    out_dir = Path(out_dir)
    rows = {key: _sorted_rows(found) for key, found in results.items() if found}
    written = []
    for test_set in SUITES[suite]:
        if test_set.key not in rows:
            continue
        table, columns = rows[test_set.key], list(RESULT_COLUMNS)
        if test_set.base in rows:
            table, columns = with_diffs(table, rows[test_set.base]), columns + DIFF_COLUMNS
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=columns)
        writer.writeheader()
        writer.writerows(table)
        written.append(atomic_write_text(out_dir / f"results-{test_set.key}.csv", text.getvalue()))
    return written
