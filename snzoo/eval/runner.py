"""Evaluating zoo entries and users' checkpoints with the 1-crop protocol (what `snzoo eval` runs)."""

from __future__ import annotations

import os
import re
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Optional, Sequence, Union

from torch.utils.data import Subset
from torchvision import transforms

from snzoo import zoo
from snzoo._factory import create_model
from snzoo.data import (
    LAYOUT_PREFIXES,
    DataError,
    build_eval_dataset,
    detect_layout,
    eval_uint8_transform_from_config,
    open_imagenet_val,
)
from snzoo.data.decoders import check_decoder
from snzoo.data.fashion_mnist import FASHION_MNIST, FashionMNIST
from snzoo._torch_utils import check_device
from snzoo.eval.engine import EvalResult, evaluate
from snzoo.eval.real_labels import load_real_labels, real_label_sets, real_labels_file
from snzoo.models import build_model, infer_model_kwargs, skeleton
from snzoo.weights import fetch_weights, hash_file, read_record, read_state_dict
from snzoo.zoo import EvalConfig

IMAGENET_EVAL = EvalConfig(dataset="imagenet-1k-val", resize=256, crop=224, interpolation="bilinear",
                           mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
WNID = re.compile(r"^n\d{8}$")


@lru_cache(maxsize=1)
def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1k WordNet ids in class-index order (sorted), as pretrained models number them."""
    text = (resources.files("snzoo.data") / "imagenet1k_wnids.txt").read_text()
    return tuple(text.split())


def class_names_for(data: Union[str, os.PathLike], num_classes: int) -> Union[Sequence[str], int]:
    """How data labels map to the model's classes: ImageNet WordNet-id folders by the standard order (so a
    subset of the 1000 folders works), folders named 0, 1, ... by their number (ImageNetV2), anything else by
    count."""
    path = Path(data)
    if path.is_dir():
        folders = [e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith(".")]
        if num_classes == 1000 and folders and all(WNID.match(f) for f in folders):
            return imagenet_wnids()
        # Folders named by class index (ImageNetV2's 0..999): the number is the label, not the sorted position.
        if folders and all(f.isdigit() and str(int(f)) == f for f in folders):
            return [str(i) for i in range(num_classes)]
    return num_classes


def _scoring(dataset, data, real_labels, classes_in_data: bool, only_classes: Optional[Sequence[int]]):
    """The dataset to score (only_classes keeps those classes' samples), the ReaL label set of every sample (by
    dataset index, so computed before any subset), and the classes the logits are restricted to."""
    if (classes_in_data or only_classes is not None or real_labels not in (None, False)) \
            and not hasattr(dataset, "samples"):
        raise DataError(f"{data}: ReaL labels and class restrictions need ImageNet images with file names; "
                        "evaluate them on ImageNet-style data")
    label_sets = None
    if real_labels is not None and real_labels is not False:
        file = None if real_labels is True or real_labels == "" else real_labels
        label_sets = real_label_sets(dataset, load_real_labels(real_labels_file(file)))
    if only_classes is not None:
        keep = set(only_classes)
        dataset = Subset(dataset, [i for i, (_, label) in enumerate(dataset.samples) if label in keep])
        if len(dataset) == 0:
            raise DataError(f"{data} holds no image of the {len(keep)} classes asked for")
        return dataset, label_sets, sorted(keep)
    return dataset, label_sets, classes_present(dataset) if classes_in_data else None


def classes_present(dataset) -> list[int]:
    """The sorted class indices that the dataset's samples carry (ImageNet-R and -A hold 200 of the 1000)."""
    if isinstance(dataset, Subset):
        return sorted({dataset.dataset.samples[i][1] for i in dataset.indices})
    return sorted({label for _, label in dataset.samples})


def _layout_or_folders(path: str) -> str:
    # A path of no known layout goes to the folder reader, whose error says what such a folder lacks.
    try:
        return detect_layout(path)
    except DataError:
        return "folders"


def _open_data(data, transform, num_classes: int, *, root, skip_bad: bool, decoder: str, **layout_options):
    """The evaluation dataset of `data` and its class names (or count): class folders and list files as they
    always were, every other layout as ImageNet val."""
    text = os.fspath(data)
    given = {k: v for k, v in layout_options.items() if v is not None}
    # A missing plain path keeps the folder layout's own message; a pattern is shards.
    pattern = any(c in text for c in "{*?[")
    plain = not text.startswith(LAYOUT_PREFIXES) and not given and not pattern and (
        not Path(text).exists() or _layout_or_folders(text) == "folders")
    if plain:
        names = class_names_for(data, num_classes)
        dataset = build_eval_dataset(data, transform, root=root, class_names=names, skip_bad=skip_bad, decoder=decoder)
        return dataset, names
    if num_classes != len(imagenet_wnids()):
        raise DataError(f"{text} is read as ImageNet val ({detect_layout(text)}), whose labels are the 1000 ImageNet "
                        f"classes, but the model has {num_classes}; evaluate an ImageNet model on it")
    dataset = open_imagenet_val(data, transform, root=root, skip_bad=skip_bad, decoder=decoder, **layout_options)
    return dataset, list(dataset.classes)


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
    split: Optional[str] = None,
    image_column: Optional[str] = None,
    label_column: Optional[str] = None,
    devkit: Optional[Union[str, os.PathLike]] = None,
    real_labels: Union[None, bool, str, os.PathLike] = None,
    classes_in_data: bool = False,
    only_classes: Optional[Sequence[int]] = None,
    decoder: str = "pil",
    **engine_options,
) -> EvalResult:
    """Evaluate a zoo entry (`name`, fetched and verified as needed) or a checkpoint file (`checkpoint` with
    `arch` or an entry `name` for its architecture and eval config) on `data`.

    `data`: class folders or a list file (any class count), `fashion-mnist`, or ImageNet val in any layout
    `snzoo.data.open_imagenet_val` reads (Hugging Face datasets with `split` / `image_column` / `label_column`,
    webdataset shards, the official archives or flat folder with `devkit`). The data is opened before the
    weights are fetched. `decoder`: "pil" (the published protocol) or "torchvision" (libjpeg-turbo JPEG decoding
    and the same transform on tensors, faster; see `snzoo.data.decoders`); Fashion-MNIST has nothing to decode.

    real_labels (True for the published real.json, fetched and verified, or a file) adds ImageNet-ReaL
    accuracy (`result.real`); classes_in_data restricts the logits to the classes present in the data before
    top-k (ImageNet-R and ImageNet-A: their 200 classes); only_classes keeps the samples of those classes and
    restricts the logits to them (the "clean" ImageNet val baselines of ImageNet-R and -A).

    The eval config is the entry's (ImageNet 1-crop: resize 256, crop 224, bilinear, for bare checkpoints),
    with resize / crop / interpolation overrides; the result records the config used. engine_options go to
    `snzoo.eval.evaluate` (batch_size, workers, device, amp, channels_last, limit, per_class, progress).
    """
    check_device(engine_options.get("device", "cpu"))
    check_decoder(decoder)
    entry = zoo.get_entry(name) if name and (checkpoint is None or "." in name) else None
    if checkpoint is not None:
        architecture = arch or (entry.architecture if entry else name)
        if architecture is None:
            raise DataError("evaluating a checkpoint needs its architecture: pass --arch ARCH (or an entry name)")
        state_dict = read_state_dict(checkpoint)
        kwargs = {**(entry.model_kwargs() if entry else {}), **infer_model_kwargs(state_dict)}
        model = build_model(architecture, kwargs, state_dict=state_dict, source=str(checkpoint),
                            pretrained_cfg=entry.to_dict() if entry else None)
        label, sha256 = Path(checkpoint).name, hash_file(Path(checkpoint)).sha256
    else:
        if name is None:
            raise DataError("name a zoo entry to evaluate, or pass --checkpoint FILE with --arch ARCH")
        entry = zoo.get_entry(name)
        # The weights come after the data is found readable: a typo in --data must not cost a download. Until
        # then the architecture on the meta device answers the questions about input channels and classes.
        model = skeleton(entry.architecture, **entry.model_kwargs())
        label = entry.name
    config = entry.eval if entry else IMAGENET_EVAL
    if model.conv1.in_channels == 1 and len(config.mean) != 1:
        # ImageNet's 3-channel normalisation cannot apply to a 1-channel model's grayscale input.
        raise DataError(f"{architecture if checkpoint is not None else label} takes {model.conv1.in_channels}-channel "
                        f"images but the eval config normalises {len(config.mean)} channels; name the checkpoint's "
                        "entry for its eval config: snzoo eval ARCH.TAG --checkpoint FILE --data ...")
    if str(data) == FASHION_MNIST:
        decoder = "pil"  # its images are arrays in memory, handed over as PIL images
    # uint8 images from the loader and one normalisation per batch: the exact tensors of the 1-crop transform.
    transform, normalize = eval_uint8_transform_from_config(config, decoder=decoder, resize=resize, crop=crop,
                                                            interpolation=interpolation)
    if model.conv1.in_channels == 1:
        transform = transforms.Compose([transforms.Grayscale(1), transform])
    if str(data) == FASHION_MNIST:
        if model.num_classes != FashionMNIST.num_classes:
            raise DataError(f"Fashion-MNIST has 10 classes but the model has {model.num_classes}")
        dataset, names = FashionMNIST("test", transform=transform), list(FashionMNIST.classes)
    else:
        dataset, names = _open_data(data, transform, model.num_classes, root=root, skip_bad=skip_bad, decoder=decoder,
                                    split=split, image_column=image_column, label_column=label_column, devkit=devkit)
    dataset, label_sets, class_subset = _scoring(dataset, data, real_labels, classes_in_data, only_classes)
    if checkpoint is None:
        weights = fetch_weights(entry)
        model = create_model(entry.name, checkpoint_path=weights)
        sha256 = (read_record(weights) or {}).get("source_sha256")
    result = evaluate(model, dataset, name=label, class_names=_class_list(names, dataset), class_subset=class_subset,
                      label_sets=label_sets, normalize=normalize, **engine_options)
    used_resize = resize or config.resize
    used_crop = crop or config.crop
    result.config.update(
        data=str(data), resize=used_resize, crop=used_crop, crop_pct=round(used_crop / used_resize, 4),
        interpolation=interpolation or config.interpolation, mean=list(config.mean), std=list(config.std),
        decoder=decoder,
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
