"""ImageNet val as distributed: ``ILSVRC2012_img_val.tar`` (read in place) or its flat folder, with the devkit.

Both hold the images flat as ``ILSVRC2012_val_NNNNNNNN.JPEG``; labels come from the devkit's ground truth
by the number in each file name (see ``snzoo.data.ilsvrc_devkit``), so a val tar or folder holding only some
of the 50,000 images works, in file-name order.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from snzoo._io import PathLike
from snzoo.data.datasets import EvalDataset, Transform, _visible
from snzoo.data.encoded import EncodedImageDataset, imagenet_classes, read_member, scan_tar
from snzoo.data.ilsvrc_devkit import VAL_NAME, DevkitLabels, find_devkit, read_devkit
from snzoo.errors import DataError

VAL_TAR = "ILSVRC2012_img_val.tar"


def _devkit_for(data: Path, devkit: Optional[PathLike]) -> DevkitLabels:
    if devkit is None:
        folder = data.parent if data.is_file() else data
        devkit = find_devkit(folder, folder.parent)
    if devkit is None:
        raise DataError(f"no ImageNet devkit found beside {data}; pass devkit=PATH (--devkit) to "
                        "ILSVRC2012_devkit_t12.tar.gz, its extracted folder or ILSVRC2012_validation_ground_truth.txt")
    return read_devkit(devkit)


class ILSVRCValArchive(EncodedImageDataset):
    """The images of ``ILSVRC2012_img_val.tar`` in file-name order, labelled by the devkit."""

    def __init__(self, val_tar: PathLike, transform: Transform | None, devkit: Optional[PathLike] = None,
                 skip_bad: bool = False, decoder: str = "pil") -> None:
        super().__init__(transform, skip_bad, decoder)
        self.val_tar = Path(val_tar)
        if not self.val_tar.is_file():
            raise DataError(f"validation archive {self.val_tar} does not exist; expected {VAL_TAR}")
        truth = _devkit_for(self.val_tar, devkit)
        members = sorted((m for m in scan_tar(str(self.val_tar)) if _visible(os.path.basename(m.name))),
                         key=lambda m: os.path.basename(m.name))
        if not members:
            raise DataError(f"{self.val_tar} holds no images; expected {VAL_TAR} with ILSVRC2012_val_*.JPEG files")
        self._members = members
        self.file_names = [os.path.basename(m.name) for m in members]
        self.samples = [(f"{self.val_tar}:{m.name}", truth.label_of(name, f"{self.val_tar}:{m.name}"))
                        for m, name in zip(members, self.file_names)]

    def _read(self, index: int) -> bytes:
        return read_member(self._members[index])


class ILSVRCValFolder(EvalDataset):
    """A flat folder of ``ILSVRC2012_val_*.JPEG`` files in file-name order, labelled by the devkit."""

    def __init__(self, folder: PathLike, transform: Transform | None, devkit: Optional[PathLike] = None,
                 skip_bad: bool = False, decoder: str = "pil") -> None:
        super().__init__(transform, skip_bad, decoder)
        self.root = Path(folder)
        names = sorted(n for n in os.listdir(self.root) if VAL_NAME.match(n)) if self.root.is_dir() else []
        if not names:
            raise DataError(f"{self.root} holds no ILSVRC2012_val_*.JPEG files; expected the flat ImageNet "
                            "validation folder")
        truth = _devkit_for(self.root, devkit)
        self.samples = [(str(self.root / n), truth.label_of(n, str(self.root / n))) for n in names]
        self.classes = list(imagenet_classes())
        self.num_classes = len(self.classes)

    def file_name(self, index: int) -> str:
        """The image's file name, e.g. ``ILSVRC2012_val_00000001.JPEG``."""
        return os.path.basename(self.samples[index][0])


def is_val_folder(path: Path) -> bool:
    """Whether ``path`` is a folder holding ``ILSVRC2012_val_*.JPEG`` files directly."""
    return path.is_dir() and any(VAL_NAME.match(e.name) for e in os.scandir(path) if e.is_file())
