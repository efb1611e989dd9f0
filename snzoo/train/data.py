"""Training and validation data of a run: Fashion-MNIST from its Debian package, or ImageNet-style folders."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from torch.utils.data import Dataset, Subset
from torchvision import transforms

from snzoo.data import DataError, ImageFolderDataset, ListFileDataset, eval_transform
from snzoo.data.augment import SeededAugmentation, eval_transform_small, final_phase_transform, train_transform
from snzoo.data.fashion_mnist import FASHION_MNIST, FASHION_MNIST_MEAN, FASHION_MNIST_STD, FashionMNIST
from snzoo.data.transforms import IMAGENET_MEAN, IMAGENET_STD



@dataclass
class TrainData:
    """The data sets of a run and the transforms the recipe switches between."""

    train: SeededAugmentation
    train_transform: Callable
    final_transform: Optional[Callable]
    train_eval: Optional[Dataset]  # training images with eval transforms (batch-average statistics)
    val: Optional[Dataset]
    val_name: str
    num_classes: int
    classes: list
    eval_config: dict
    collate: Optional[Callable] = None  # the DataLoader's collate_fn (None: stack the items)
    val_limit: Optional[int] = None  # validate on the first N images only (data sets that must stay whole)


def _first(dataset: Dataset, count: Optional[int]) -> Dataset:
    return Subset(dataset, range(min(count, len(dataset)))) if count else dataset


class _Grayscale(Dataset):
    """Images of a folder as single-channel PIL images, for models with in_chans=1."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.classes = getattr(dataset, "classes", None)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, *rest = self.dataset[index]
        return (image.convert("L"), *rest)


def _folder_or_list(root: Path, evaluation: Callable) -> tuple[Any, Any, Any, list]:
    """(train images, train with eval transforms, val, class names) from class folders or list files."""
    if (root / "train").is_dir():
        train = ImageFolderDataset(root / "train", transform=None)
        classes = list(train.classes)
        val = ImageFolderDataset(root / "val", evaluation, class_names=classes) if (root / "val").is_dir() else None
        return train, ImageFolderDataset(root / "train", transform=evaluation), val, classes
    train = ListFileDataset(root / "train.txt", root, transform=None)
    classes = [str(i) for i in range(train.num_classes)]
    val = ListFileDataset(root / "val.txt", root, evaluation, num_classes=train.num_classes) \
        if (root / "val.txt").is_file() else None
    return train, ListFileDataset(root / "train.txt", root, evaluation), val, classes


def build_train_data(data: str, recipe: dict, seed: int = 0, subset: Optional[int] = None,
                     val_subset: Optional[int] = None, in_chans: int = 3,
                     normalization: Optional[tuple] = None) -> TrainData:
    """`fashion-mnist`, or a folder with train/ (and optionally val/) class folders; subset keeps the first N.

    in_chans=1 reads folder images as grayscale; normalization (mean, std) replaces the data set's default,
    e.g. the pretrained entry's when fine-tuning.
    """
    aug = recipe["augmentation"]
    if data == FASHION_MNIST:
        mean, std, crop = FASHION_MNIST_MEAN, FASHION_MNIST_STD, aug.get("crop", 28)
        evaluation = eval_transform_small(crop, mean, std)
        train_images: Any = FashionMNIST("train")
        train_eval: Any = FashionMNIST("train", transform=evaluation)
        val: Any = FashionMNIST("test", transform=evaluation)
        classes, name = list(FashionMNIST.classes), "fashion-mnist-test"
        eval_config = {"dataset": name, "resize": crop, "crop": crop, "interpolation": "bilinear"}
    else:
        root = Path(data)
        if not (root / "train").is_dir() and not (root / "train.txt").is_file():
            raise DataError(f"training data {root} has neither a train/ folder nor a train.txt list file; expected "
                            f"{root}/train/<class>/<image> (and val/), or {root}/train.txt (and val.txt) with "
                            f"'relative/path label' lines, or --data {FASHION_MNIST}")
        mean, std = normalization or ((IMAGENET_MEAN, IMAGENET_STD) if in_chans == 3 else ((0.5,), (0.5,)))
        crop = aug.get("crop", 224)
        resize = int(round(crop / 0.875)) if aug.get("random_resized_crop", True) else crop
        evaluation = eval_transform(resize=resize, crop=crop, mean=mean, std=std)
        if in_chans == 1:
            evaluation = transforms.Compose([transforms.Grayscale(1), evaluation])
        train_images, train_eval, val, classes = _folder_or_list(root, evaluation)
        if in_chans == 1:
            train_images = _Grayscale(train_images)
        name = f"{root.name}-val"
        eval_config = {"dataset": name, "resize": resize, "crop": crop, "interpolation": "bilinear"}
    eval_config.update(mean=list(mean), std=list(std))
    augmentation = train_transform(aug, mean, std)
    final = final_phase_transform(aug, mean, std) if aug.get("final_phase") else None
    return TrainData(
        train=SeededAugmentation(_first(train_images, subset), augmentation, seed),
        train_transform=augmentation,
        final_transform=final,
        train_eval=_first(train_eval, subset),
        val=_first(val, val_subset) if val is not None else None,
        val_name=name,
        num_classes=len(classes),
        classes=classes,
        eval_config=eval_config,
    )
