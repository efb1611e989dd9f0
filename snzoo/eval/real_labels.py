"""ImageNet-ReaL: the reassessed labels of ImageNet val (Beyer et al., "Are we done with ImageNet?", 2020).

`real.json` (google-research/reassessed-imagenet, Apache-2.0) is a list of 50,000 label lists, one per val image
in the order ILSVRC2012_val_00000001.JPEG ... 00050000.JPEG. A top-k hit is any of the k best classes in the
image's list; images with an empty list are left out, as the paper and timm do. The file is pinned and fetched
like weights, or given as a file.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Optional, Sequence

from torch.utils.data import Dataset

from snzoo._io import PathLike
from snzoo.data import sample_file_name
from snzoo.errors import DataError, UnpinnedWeightsWarning
from snzoo.weights import fetch_file, hash_file
from snzoo.zoo import Source

REAL_IMAGES = 50_000
REAL_SOURCE = Source(
    url="https://raw.githubusercontent.com/google-research/reassessed-imagenet/master/real.json",
    kind="https", format="original", file_name="real.json",
    sha256="d83e9bff374c631aae8439eb064c7019acc56e1b3bc3f56b8380c2a710b0220b", md5=None, size=388_478,
)
_VAL_NUMBER = re.compile(r"ILSVRC2012_val_(\d{8})\.", re.IGNORECASE)


def real_labels_file(file: Optional[PathLike] = None, source: Source = REAL_SOURCE) -> Path:
    """The ReaL label file: `file` when given (a copy that is not the published one is used with a warning),
    else the verified cached copy of `source`, fetched on first use."""
    if file is None:
        return fetch_file(source, "the ImageNet-ReaL labels (real.json)", option="--real-labels")
    path = Path(file).expanduser()
    if not path.is_file():
        raise DataError(f"--real-labels {path}: no such file; pass the real.json of google-research/"
                        "reassessed-imagenet, or --real-labels without a file to fetch it")
    if source.sha256 and hash_file(path).sha256 != source.sha256:
        warnings.warn(UnpinnedWeightsWarning(
            f"{path} is not the published real.json (sha256 {source.sha256}); its ReaL numbers are not comparable "
            "to published ones"), stacklevel=2)
    return path


def load_real_labels(path: PathLike) -> list[list[int]]:
    """The 50,000 label lists of a real.json, checked: one clear DataError line for anything else."""
    path = Path(path)
    try:
        labels = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{path}: not a readable real.json ({type(exc).__name__}); expected a JSON list of "
                        f"{REAL_IMAGES} label lists") from None
    if not isinstance(labels, list) or len(labels) != REAL_IMAGES:
        got = f"{len(labels)} entries" if isinstance(labels, list) else f"a {type(labels).__name__}"
        raise DataError(f"{path}: holds {got}, expected a list of {REAL_IMAGES} label lists (one per ImageNet val "
                        "image); it is not the ReaL file")
    for number, entry in enumerate(labels, start=1):
        if not (isinstance(entry, list) and all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c < 1000
                                                for c in entry)):
            raise DataError(f"{path}: entry {number} is {json.dumps(entry)[:60]}, expected a list of class indices "
                            "0-999")
    return labels


def real_label_sets(dataset: Dataset, labels: Sequence[Sequence[int]]) -> list[list[int]]:
    """Each sample's ReaL label list, by its ImageNet val file name (ILSVRC2012_val_00000001.JPEG, ...)."""
    sets = []
    for index in range(len(dataset)):
        name = sample_file_name(dataset, index)
        match = _VAL_NUMBER.search(Path(name).name)
        if match is None or not 1 <= int(match.group(1)) <= len(labels):
            raise DataError(f"ImageNet-ReaL labels are keyed by ImageNet val file names (ILSVRC2012_val_00000001"
                            f".JPEG ...), but sample {index} is {name!r}; evaluate ImageNet val itself")
        sets.append(list(labels[int(match.group(1)) - 1]))
    return sets
