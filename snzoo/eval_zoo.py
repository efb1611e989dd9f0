"""Evaluating zoo entries and users' checkpoints with the 1-crop protocol, and timm-style results files."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Optional, Sequence, Union

from torchvision import transforms

from snzoo import zoo
from snzoo.checkpoint import load_checked, read_state_dict
from snzoo.data import DataError, build_eval_dataset, eval_transform_from_config
from snzoo.data.fashion_mnist import FashionMNIST
from snzoo.entry import EvalConfig
from snzoo.errors import OutputError
from snzoo.evaluate import EvalResult, check_device, evaluate
from snzoo.factory import create_model
from snzoo.models import get_architecture
from snzoo.weights.convert import read_record
from snzoo.weights.download import hash_file
from snzoo.weights.fetch import fetch_weights
from snzoo.weights.verify import infer_model_kwargs

IMAGENET_EVAL = EvalConfig(dataset="imagenet-1k-val", resize=256, crop=224, interpolation="bilinear",
                           mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
FASHION_MNIST = "fashion-mnist"
WNID = re.compile(r"^n\d{8}$")
RESULT_COLUMNS = ["model", "top1", "top1_err", "top5", "top5_err", "param_count", "img_size", "crop_pct",
                  "interpolation", "n", "images_per_s", "checkpoint_sha256"]


@lru_cache(maxsize=1)
def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1k WordNet ids in class-index order (sorted), as pretrained models number them."""
    text = (resources.files("snzoo.data") / "imagenet1k_wnids.txt").read_text()
    return tuple(text.split())


def class_names_for(data: Union[str, os.PathLike], num_classes: int) -> Union[Sequence[str], int]:
    """How data labels map to the model's classes: ImageNet WordNet-id folders by the standard order
    (so a subset of the 1000 folders works), anything else by count."""
    path = Path(data)
    if num_classes == 1000 and path.is_dir():
        folders = [e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith(".")]
        if folders and all(WNID.match(f) for f in folders):
            return imagenet_wnids()
    return num_classes


def _class_list(names: Union[Sequence[str], int], dataset) -> Optional[list[str]]:
    return list(names) if not isinstance(names, int) else getattr(dataset, "classes", None)


def evaluate_model(
    name: Optional[str] = None,
    *,
    data: Union[str, os.PathLike],
    checkpoint: Optional[Union[str, os.PathLike]] = None,
    arch: Optional[str] = None,
    root: Optional[Union[str, os.PathLike]] = None,
    resize: Optional[int] = None,
    crop: Optional[int] = None,
    interpolation: Optional[str] = None,
    skip_bad: bool = False,
    **engine_options,
) -> EvalResult:
    """Evaluate a zoo entry (`name`, fetched and verified as needed) or a checkpoint file (`checkpoint` with
    `arch` or an entry `name` for its architecture and eval config) on `data` (image folder or list file).

    The eval config is the entry's (ImageNet 1-crop: resize 256, crop 224, bilinear, for bare checkpoints),
    with resize / crop / interpolation overrides; the result records the config used. engine_options go to
    `snzoo.evaluate.evaluate` (batch_size, workers, device, amp, channels_last, limit, per_class, progress).
    """
    check_device(engine_options.get("device", "cpu"))
    entry = zoo.get_entry(name) if name and (checkpoint is None or "." in name) else None
    if checkpoint is not None:
        architecture = arch or (entry.architecture if entry else name)
        if architecture is None:
            raise DataError("evaluating a checkpoint needs its architecture: pass --arch ARCH (or an entry name)")
        state_dict = read_state_dict(checkpoint)
        kwargs = {**(entry.model_kwargs() if entry else {}), **infer_model_kwargs(state_dict)}
        model = get_architecture(architecture).build(**kwargs)
        model.architecture = architecture
        load_checked(model, state_dict, source=str(checkpoint))
        label, sha256 = Path(checkpoint).name, hash_file(Path(checkpoint)).sha256
    else:
        if name is None:
            raise DataError("name a zoo entry to evaluate, or pass --checkpoint FILE with --arch ARCH")
        entry = zoo.get_entry(name)
        # The weights come after the data is found readable: a typo in --data must not cost a download.
        model = create_model(entry.name)
        label = entry.name
    config = entry.eval if entry else IMAGENET_EVAL
    if model.conv1.in_channels == 1 and len(config.mean) != 1:
        # ImageNet's 3-channel normalisation cannot apply to a 1-channel model's grayscale input.
        raise DataError(f"{architecture if checkpoint is not None else label} takes {model.conv1.in_channels}-channel "
                        f"images but the eval config normalises {len(config.mean)} channels; name the checkpoint's "
                        "entry for its eval config: snzoo eval ARCH.TAG --checkpoint FILE --data ...")
    transform = eval_transform_from_config(config, resize=resize, crop=crop, interpolation=interpolation)
    if model.conv1.in_channels == 1:
        transform = transforms.Compose([transforms.Grayscale(1), transform])
    if str(data) == FASHION_MNIST:
        if model.num_classes != FashionMNIST.num_classes:
            raise DataError(f"Fashion-MNIST has 10 classes but the model has {model.num_classes}")
        dataset, names = FashionMNIST("test", transform=transform), list(FashionMNIST.classes)
    else:
        names = class_names_for(data, model.num_classes)
        dataset = build_eval_dataset(data, transform, root=root, class_names=names, skip_bad=skip_bad)
    if checkpoint is None:
        weights = fetch_weights(entry)
        load_checked(model, read_state_dict(weights), source=str(weights))
        sha256 = (read_record(weights) or {}).get("source_sha256")
    result = evaluate(model, dataset, name=label, class_names=_class_list(names, dataset), **engine_options)
    used_resize = resize or config.resize
    used_crop = crop or config.crop
    result.config.update(
        data=str(data), resize=used_resize, crop=used_crop, crop_pct=round(used_crop / used_resize, 4),
        interpolation=interpolation or config.interpolation, mean=list(config.mean), std=list(config.std),
    )
    result.param_count = sum(p.numel() for p in model.parameters())
    result.checkpoint_sha256 = sha256
    if entry is not None:
        published = entry.metrics.get(entry.eval.dataset)
        if published is not None and published.top1 is not None:
            result.published = {"dataset": entry.eval.dataset, "top1": published.top1, "top5": published.top5,
                                 "top1_diff": result.top1 - published.top1,
                                 "top5_diff": None if published.top5 is None else result.top5 - published.top5}
    return result


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
    path = check_results_file(path)
    rows = [result_row(r) for r in results]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        _write_results(path, tmp, rows)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):  # not there when the write could not even start
            tmp.unlink(missing_ok=True)
        raise OutputError.cannot_write(path, exc) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


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


def _write_results(path: Path, tmp: Path, rows: list[dict]) -> None:
    if path.suffix.lower() == ".json":
        try:
            existing = json.loads(path.read_text()) if path.exists() and path.stat().st_size else []
        except ValueError:
            existing = None
        if not isinstance(existing, list):
            raise DataError(f"results file {path} does not hold a JSON list; choose another file")
        tmp.write_text(json.dumps(existing + rows, indent=2) + "\n")
    else:
        previous = path.read_text() if path.exists() else ""
        if previous and previous.splitlines()[0].split(",") != RESULT_COLUMNS:
            raise DataError(f"results file {path} has other columns than {','.join(RESULT_COLUMNS)}; choose another file")
        with open(tmp, "w", newline="") as f:
            f.write(previous)
            writer = csv.DictWriter(f, fieldnames=RESULT_COLUMNS)
            if not previous:
                writer.writeheader()
            writer.writerows(rows)
