"""Training augmentation (original PCA lighting, recipe transforms, per-sample seeding) and Fashion-MNIST."""

from __future__ import annotations

import gzip
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from torchvision import transforms

from photos import photo_paths
from snzoo import zoo
from snzoo.data import DataError, ImageFolderDataset, load_rgb
from snzoo.data.augment import (
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    Lighting,
    SeededAugmentation,
    eval_transform_small,
    final_phase_transform,
    train_transform,
)
from snzoo.data.fashion_mnist import FASHION_MNIST_DIR, FashionMNIST, read_idx

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
COSINE = "resnet50v1_sn.in1k_8x32_cos120"
STEP = "resnet50v1_sn.in1k_8x32_step100"
SSN = "resnet50v1_ssn.in1k_8x32_step100"
SMALL = {"crop": 28, "random_resized_crop": False, "pad_crop": 4, "hflip": True, "lighting": None,
         "color_jitter": None, "grayscale_to_rgb": False, "final_phase": None}

# The published constants, written out again here so the test does not trust the module's copies.
EIGVAL = np.array([0.2175, 0.0188, 0.0045])
ROWS = np.array([[0.4009, 0.7192, -0.5675], [-0.8140, -0.0045, -0.5808], [0.4203, -0.6948, -0.5836]])
FB_COLUMNS = np.array([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]])

needs_fashion_mnist = pytest.mark.skipif(not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
                                         reason="Debian package dataset-fashion-mnist is not installed")


def _aug(name: str) -> dict:
    return zoo.get_entry(name).recipe["augmentation"]


def _photo_tensor(index: int = 2, size: int = 96) -> torch.Tensor:
    image = load_rgb(photo_paths()[index])
    return transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor()])(image)


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    for i, path in enumerate(photo_paths()):
        folder = root / f"class{i % 2}"
        folder.mkdir(exist_ok=True)
        shutil.copy(path, folder / path.name)
    return root


# --- Lighting -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 123])
def test_lighting_matches_numpy_formula_on_a_photo(seed):
    image = _photo_tensor()
    torch.manual_seed(seed)
    out = Lighting(0.1)(image)
    torch.manual_seed(seed)
    alpha = torch.randn(3).double().numpy() * 0.1
    offset = sum(EIGVAL[i] * alpha[i] * ROWS[i] for i in range(3))
    expected = image.double().numpy() + offset[:, None, None]
    np.testing.assert_allclose(out.double().numpy(), expected, atol=1e-6)

    delta = (out - image).flatten(1)
    # One offset per channel, the same at every pixel, and not clamped to [0, 1].
    assert torch.all(delta.amax(1) - delta.amin(1) < 1e-6)
    assert not torch.allclose(delta[0, 0], delta[1, 0])
    # The original's pairing, not fb.resnet.torch's (eigenvalue i with eigenvector column i).
    fb_offset = FB_COLUMNS @ (EIGVAL * alpha)
    assert np.abs(delta[:, 0].double().numpy() - fb_offset).max() > 1e-3


def test_lighting_only_for_rgb_tensors_and_zero_std_is_identity():
    image = _photo_tensor()
    assert Lighting(0.0)(image) is image
    with pytest.raises(DataError, match="3, H, W"):
        Lighting()(image[:1])
    with pytest.raises(DataError, match="expected"):
        Lighting(eigval=[1.0, 2.0])
    assert "pairing differs from fb.resnet.torch" in " ".join(Lighting.__doc__.split())


# --- recipe transforms ----------------------------------------------------------------------------------------

def test_ssn_recipe_has_color_jitter_in_the_original_order():
    steps = train_transform(_aug(SSN), MEAN, STD).transforms
    assert [type(s).__name__ for s in steps] == [
        "RandomResizedCrop", "RandomHorizontalFlip", "ColorJitter", "ToTensor", "Lighting", "Normalize"]
    jitter = steps[2]
    assert jitter.brightness == jitter.contrast == jitter.saturation == (0.6, 1.4) and jitter.hue is None
    assert steps[0].scale == (0.08, 1.0) and steps[0].interpolation == transforms.InterpolationMode.BILINEAR

    plain = [type(s).__name__ for s in train_transform(_aug(COSINE), MEAN, STD).transforms]
    assert plain == ["RandomResizedCrop", "RandomHorizontalFlip", "ToTensor", "Lighting", "Normalize"]


def test_train_transform_on_photos_is_seeded_per_sample(photo_folder):
    dataset = ImageFolderDataset(photo_folder, transform=None)
    transform = train_transform(_aug(SSN), MEAN, STD)
    a = SeededAugmentation(dataset, transform, seed=1)
    b = SeededAugmentation(dataset, transform, seed=1)
    other_seed = SeededAugmentation(dataset, transform, seed=2)
    for index in range(len(dataset)):
        image, label, idx = a[index]
        assert image.shape == (3, 224, 224) and image.dtype == torch.float32
        assert (label, idx) == (dataset.samples[index][1], index)
        assert torch.equal(image, b[index][0])
        assert not torch.allclose(image, other_seed[index][0])
    # The same photo at two positions of a plain (image, label) list gets different crops: the index counts.
    repeated = SeededAugmentation([(load_rgb(photo_paths()[0]), 3)] * 2, transform, seed=1)
    (first, label, idx), (second, _, _) = repeated[0], repeated[1]
    assert (label, idx) == (3, 0) and not torch.allclose(first, second)
    first_epoch = a[0][0]
    a.set_epoch(1)
    assert not torch.allclose(first_epoch, a[0][0])
    a.set_epoch(0)
    assert torch.equal(first_epoch, a[0][0])


def test_seeding_leaves_global_rng_states_alone(photo_folder):
    wrapper = SeededAugmentation(ImageFolderDataset(photo_folder, transform=None),
                                 train_transform(_aug(COSINE), MEAN, STD), seed=0)
    torch.manual_seed(5)
    random.seed(5)
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    wrapper[0]
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == python_state


def test_final_phase_center_is_resize_crop_flip_plus_lighting(photo_folder):
    aug = _aug(STEP)
    assert aug["final_phase"] == {"epochs": 5, "resize": 256, "crop": "center"}
    transform = final_phase_transform(aug, MEAN, STD)
    assert [type(s).__name__ for s in transform.transforms] == [
        "Resize", "CenterCrop", "RandomHorizontalFlip", "ToTensor", "Lighting", "Normalize"]
    image = load_rgb(photo_paths()[0])
    reference = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                                    transforms.Normalize(MEAN, STD)])(image)
    flips = set()
    for seed in range(6):
        torch.manual_seed(seed)
        out = transform(image)
        for flipped, candidate in ((False, reference), (True, reference.flip(-1))):
            delta = (out - candidate).flatten(1)
            # Only the lighting offset (divided by std) separates them: constant per channel.
            if torch.all(delta.amax(1) - delta.amin(1) < 1e-4):
                flips.add(flipped)
                assert delta.abs().max() > 0
                break
        else:
            pytest.fail(f"seed {seed}: final-phase output is not the centre crop (flipped or not) plus lighting")
    assert flips == {False, True}


def test_final_phase_random_crop_for_ssn_and_missing_phase():
    aug = _aug(SSN)
    transform = final_phase_transform(aug, MEAN, STD)
    assert [type(s).__name__ for s in transform.transforms] == [
        "Resize", "RandomCrop", "RandomHorizontalFlip", "ColorJitter", "ToTensor", "Lighting", "Normalize"]
    image = load_rgb(photo_paths()[1])
    torch.manual_seed(0)
    first = transform(image)
    torch.manual_seed(1)
    second = transform(image)
    assert first.shape == second.shape == (3, 224, 224) and not torch.allclose(first, second)
    with pytest.raises(DataError, match="no final_phase"):
        final_phase_transform(_aug(COSINE), MEAN, STD)
    with pytest.raises(DataError, match="'center' or 'random'"):
        final_phase_transform({**aug, "final_phase": {"epochs": 5, "resize": 256, "crop": "middle"}}, MEAN, STD)


def test_bad_augmentation_settings():
    with pytest.raises(DataError, match="unknown augmentation key 'mixup'.*pad_crop.*grayscale_to_rgb"):
        train_transform({**_aug(COSINE), "mixup": 0.2}, MEAN, STD)
    with pytest.raises(DataError, match="both random_resized_crop and pad_crop"):
        train_transform({**_aug(COSINE), "pad_crop": 4}, MEAN, STD)
    with pytest.raises(DataError, match="lighting 'fb'"):
        train_transform({**_aug(COSINE), "lighting": "fb"}, MEAN, STD)
    with pytest.raises(DataError, match="lighting needs RGB"):
        train_transform({**SMALL, "lighting": "original"}, FASHION_MNIST_MEAN, FASHION_MNIST_STD)
    with pytest.raises(DataError, match="mean has 2 values"):
        train_transform(SMALL, (0.5, 0.5), (0.5,))


# --- small images ---------------------------------------------------------------------------------------------

@needs_fashion_mnist
def test_small_recipe_pads_and_crops_fashion_mnist():
    dataset = FashionMNIST("test")
    image, _, _ = dataset[3]
    pixels = transforms.ToTensor()(image)[0]
    padded = torch.nn.functional.pad(pixels, (4, 4, 4, 4))
    windows = {(dy, dx, flip) for dy in range(9) for dx in range(9) for flip in (False, True)}
    transform = train_transform(SMALL, (0.0,), (1.0,))  # identity normalisation: outputs are raw pixels
    seen = set()
    for seed in range(20):
        torch.manual_seed(seed)
        out = transform(image)
        assert out.shape == (1, 28, 28)
        match = [(dy, dx, flip) for dy, dx, flip in windows
                 if torch.equal(out[0].flip(-1) if flip else out[0], padded[dy:dy + 28, dx:dx + 28])]
        assert match, f"seed {seed}: output is not a 28x28 window of the 4-pixel padded image"
        seen.add(match[0])
    assert len(seen) > 5

    rgb = train_transform({**SMALL, "grayscale_to_rgb": True}, FASHION_MNIST_MEAN * 3, FASHION_MNIST_STD * 3)(image)
    assert rgb.shape == (3, 28, 28) and torch.equal(rgb[0], rgb[1]) and torch.equal(rgb[1], rgb[2])


@needs_fashion_mnist
def test_eval_transform_small_resizes_only_when_needed():
    image = FashionMNIST("test")[0][0]
    direct = (transforms.ToTensor()(image) - FASHION_MNIST_MEAN[0]) / FASHION_MNIST_STD[0]
    assert torch.allclose(eval_transform_small(28)(image), direct, atol=1e-6)
    assert eval_transform_small(32)(image).shape == (1, 32, 32)


@needs_fashion_mnist
def test_seeded_batches_same_for_any_workers_and_after_resume():
    dataset = FashionMNIST("test")
    aug = {**SMALL, "random_resized_crop": True, "pad_crop": None, "color_jitter": 0.4}
    transform = train_transform(aug, FASHION_MNIST_MEAN, FASHION_MNIST_STD)
    order = list(range(0, 640, 10))

    def batches(workers: int, indices: list[int], epoch: int = 1) -> list[torch.Tensor]:
        wrapper = SeededAugmentation(dataset, transform, seed=7)
        wrapper.set_epoch(epoch)
        loader = DataLoader(wrapper, batch_size=16, sampler=indices, num_workers=workers)
        out = []
        for images, labels, idx in loader:
            assert torch.equal(labels, dataset.targets[idx])
            out.append(images)
        return out

    single = batches(0, order)
    assert len(single) == 4 and single[0].shape == (16, 1, 28, 28)
    assert all(torch.equal(x, y) for x, y in zip(single, batches(2, order)))
    resumed = batches(0, order[32:])  # a fresh wrapper starting mid-epoch
    assert torch.equal(resumed[0], single[2]) and torch.equal(resumed[1], single[3])
    assert not torch.allclose(batches(0, order[:16], epoch=2)[0], single[0])


@needs_fashion_mnist
def test_seeded_augmentation_needs_pil_images():
    with pytest.raises(DataError, match="transform=None"):
        SeededAugmentation(FashionMNIST("test", transform=transforms.ToTensor()), transforms.ToTensor(), 0)
    with pytest.raises(DataError, match="whole number"):
        SeededAugmentation(FashionMNIST("test"), transforms.ToTensor(), 0).set_epoch(-1)


# --- Fashion-MNIST --------------------------------------------------------------------------------------------

def _decode(path: Path, header: int) -> np.ndarray:
    return np.frombuffer(gzip.open(path).read()[header:], dtype=np.uint8)


@needs_fashion_mnist
def test_fashion_mnist_splits_labels_and_first_sample():
    train, test = FashionMNIST("train"), FashionMNIST("test")
    assert (len(train), len(test)) == (60000, 10000)
    assert train.num_classes == 10 and train.classes[9] == "Ankle boot" and train.classes[0] == "T-shirt/top"
    assert torch.bincount(train.targets).tolist() == [6000] * 10
    assert torch.bincount(test.targets).tolist() == [1000] * 10

    pixels = _decode(FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz", 16)[:784].reshape(28, 28)
    label = int(_decode(FASHION_MNIST_DIR / "train-labels-idx1-ubyte.gz", 8)[0])
    image, got_label, index = train[0]
    assert image.mode == "L" and image.size == (28, 28) and index == 0
    assert np.array_equal(np.asarray(image), pixels) and got_label == label == 9
    assert test[-1][2] == 9999
    with pytest.raises(IndexError):
        test[10000]


@needs_fashion_mnist
def test_normalisation_constants_match_training_set():
    # Exact moments from the histogram of the 8-bit values, over all 47 million training pixels.
    counts = np.bincount(FashionMNIST("train").images.ravel(), minlength=256)
    values = np.arange(256) / 255
    mean = (counts * values).sum() / counts.sum()
    std = np.sqrt((counts * (values - mean) ** 2).sum() / counts.sum())
    assert abs(mean - FASHION_MNIST_MEAN[0]) < 1e-3 and abs(std - FASHION_MNIST_STD[0]) < 1e-3


@needs_fashion_mnist
def test_read_idx_rejects_corrupt_and_truncated_files(tmp_path):
    real = (FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").read_bytes()
    plain = gzip.decompress(real)
    cases = {
        "cut.gz": (real[: len(real) // 2], "cut.gz"),
        "short": (plain[:-5], "truncated"),
        "long": (plain + b"\0", "longer than its header"),
        "magic": (b"\x01\x02" + plain[2:], "bad magic"),
        "dtype": (plain[:2] + b"\x07" + plain[3:], "type code 0x07"),
        "header": (plain[:6], "inside its header"),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(DataError, match=message) as info:
            read_idx(path)
        assert str(path) in str(info.value) and "\n" not in str(info.value)
    (tmp_path / "plain").write_bytes(plain)
    assert np.array_equal(read_idx(tmp_path / "plain"), read_idx(FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz"))


@needs_fashion_mnist
def test_fashion_mnist_folder_from_env_and_bad_folders(tmp_path, monkeypatch):
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (tmp_path / name).write_bytes(gzip.decompress((FASHION_MNIST_DIR / f"{name}.gz").read_bytes()))
    monkeypatch.setenv("SNZOO_FASHION_MNIST", str(tmp_path))
    test = FashionMNIST("test")
    assert len(test) == 10000 and test.root == tmp_path
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        FashionMNIST("train")

    with pytest.raises(DataError, match=r"apt-get install dataset-fashion-mnist.*SNZOO_FASHION_MNIST"):
        FashionMNIST("test", root=tmp_path / "missing")
    with pytest.raises(DataError, match="unknown Fashion-MNIST split 'val'"):
        FashionMNIST("val")

    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\0\0\x08\x01\0\0\0\x05\0\1\2\3")
    with pytest.raises(DataError, match="truncated"):
        FashionMNIST("test")
