"""The ILSVRC2012 devkit's validation labels, mapped to the models' class indices.

The devkit numbers classes by ILSVRC2012_ID (1-1000, in the devkit's own order) and its ground-truth file
lists one ID per validation image (line n = ``ILSVRC2012_val_{n:08d}.JPEG``). The models number classes by
sorted WordNet id, which is a different order: ``meta.mat``'s ``synsets`` give ID -> WordNet id, and the
WordNet id gives the model's index. Using the IDs (minus one) directly is the classic mistake that leaves
accuracy near zero; the two orders are never confused here because IDs are only ever read through meta.mat.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
from pathlib import Path
from typing import NamedTuple, Optional

from snzoo._io import PathLike
from snzoo.data.datasets import _cause
from snzoo.data.encoded import imagenet_classes, require, wnid_label
from snzoo.errors import DataError

DEVKIT_NAMES = ("ILSVRC2012_devkit_t12.tar.gz", "ILSVRC2012_devkit_t12.tar", "ILSVRC2012_devkit_t12")
GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
META = "meta.mat"
VAL_NAME = re.compile(r"^ILSVRC2012_val_(\d{8})\.JPEG$")
_EXPECTED = (f"expected ILSVRC2012_devkit_t12.tar.gz, its extracted folder, or {GROUND_TRUTH} with the devkit's "
             f"{META} beside it")


class DevkitLabels(NamedTuple):
    """Validation labels from a devkit: ``labels[n - 1]`` is the model's class index of image number n."""

    labels: list[int]
    source: str

    def label_of(self, file_name: str, where: str) -> int:
        """The class index of an ``ILSVRC2012_val_NNNNNNNN.JPEG`` image, found by the number in its name."""
        match = VAL_NAME.match(file_name)
        if match is None:
            raise DataError(f"{where}: {file_name!r} is not an ImageNet validation image name; expected "
                            "ILSVRC2012_val_00000001.JPEG and so on")
        number = int(match.group(1))
        if not 1 <= number <= len(self.labels):
            raise DataError(f"{self.source} has {len(self.labels)} ground-truth lines but {where} is image "
                            f"{number}; expected one line per validation image (50000 for ImageNet val)")
        return self.labels[number - 1]


def find_devkit(*folders: Path) -> Optional[Path]:
    """The devkit (archive, folder or ground-truth file) lying in the first of ``folders`` that holds one."""
    for folder in folders:
        for name in (*DEVKIT_NAMES, GROUND_TRUTH):
            if (folder / name).exists():
                return folder / name
    return None


def _id_to_label(meta: bytes, source: str) -> dict[int, int]:
    scipy_io = require("scipy.io", "the ImageNet devkit's meta.mat")
    try:
        synsets = scipy_io.loadmat(io.BytesIO(meta), squeeze_me=True)["synsets"]
        ids = [int(v) for v in synsets["ILSVRC2012_ID"]]
        wnids = [str(v) for v in synsets["WNID"]]
    except (KeyError, ValueError, TypeError, IndexError, OSError) as exc:
        raise DataError(f"{source} is not the devkit's meta.mat ({_cause(exc)}); expected a 'synsets' struct "
                        "array with ILSVRC2012_ID and WNID fields") from None
    # IDs 1-1000 are the leaf synsets, the classes; higher IDs are their WordNet ancestors.
    mapping = {i: wnid_label(w, source) for i, w in zip(ids, wnids) if 1 <= i <= len(imagenet_classes())}
    if sorted(mapping) != list(range(1, 1001)) or len(set(mapping.values())) != 1000:
        raise DataError(f"{source} maps {len(set(mapping.values()))} distinct ImageNet classes to IDs 1-1000; "
                        "expected each of the 1000 classes exactly once")
    return mapping


def _ground_truth(text: str, source: str, mapping: dict[int, int]) -> list[int]:
    labels = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            labels.append(mapping[int(line)])
        except (ValueError, KeyError):
            raise DataError(f"{source} line {number} {line.strip()!r} is not an ILSVRC2012_ID; expected one "
                            "ID from 1 to 1000 per line") from None
    if not labels:
        raise DataError(f"{source} is empty; expected one ILSVRC2012_ID per validation image")
    return labels


def _from_tar(path: Path) -> tuple[bytes, str]:
    try:
        with tarfile.open(path) as tar:
            members = {os.path.basename(m.name): m for m in tar if m.isfile()}
            missing = [name for name in (META, GROUND_TRUTH) if name not in members]
            if missing:
                raise DataError(f"devkit {path} has no data/{missing[0]}; {_EXPECTED}")
            meta = tar.extractfile(members[META]).read()
            truth = tar.extractfile(members[GROUND_TRUTH]).read().decode("ascii", "replace")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"cannot read devkit {path}: {_cause(exc)}; {_EXPECTED}") from None
    return meta, truth


def _from_files(meta: Path, truth: Path) -> tuple[bytes, str]:
    for path in (meta, truth):
        if not path.is_file():
            raise DataError(f"devkit file {path} does not exist; {_EXPECTED}")
    return meta.read_bytes(), truth.read_text(encoding="ascii", errors="replace")


def read_devkit(devkit: PathLike) -> DevkitLabels:
    """The validation labels of a devkit archive, extracted devkit folder, or ground-truth file (meta.mat beside)."""
    path = Path(devkit)
    if not path.exists():
        raise DataError(f"devkit {path} does not exist; {_EXPECTED}")
    if path.is_dir():
        data = path / "data" if (path / "data").is_dir() else path
        meta, truth = _from_files(data / META, data / GROUND_TRUTH)
        source = str(data / GROUND_TRUTH)
    elif path.name.endswith((".tar.gz", ".tgz", ".tar")):
        meta, truth = _from_tar(path)
        source = f"{path}:{GROUND_TRUTH}"
    else:
        meta, truth = _from_files(path.parent / META, path)
        source = str(path)
    return DevkitLabels(_ground_truth(truth, source, _id_to_label(meta, f"meta.mat of {path}")), source)
