"""Evaluation data: the 1-crop transform, image decoding, folder and list-file datasets, bad inputs."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from torch.utils.data import DataLoader
from torchvision.transforms import InterpolationMode
from torchvision.transforms._presets import ImageClassification

from photos import photo_paths
from snzoo import zoo
from snzoo.data import (
    BadImageError,
    DataError,
    ImageFolderDataset,
    ListFileDataset,
    Skipped,
    build_eval_dataset,
    collate_skip_bad,
    eval_transform,
    eval_transform_from_config,
    load_rgb,
)
from snzoo.zoo import EvalConfig
from snzoo.errors import SnzooError

PRESET = ImageClassification(crop_size=224, resize_size=256, interpolation=InterpolationMode.BILINEAR)
WNIDS = ("n01440764", "n01443537", "n01484850")


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


def _photo(i: int) -> Image.Image:
    with Image.open(photo_paths()[i]) as image:
        return image.convert("RGB")


@pytest.fixture(scope="module")
def variants(tmp_path_factory) -> dict[str, Path]:
    """Real photographs re-saved in the awkward forms ImageNet and user data sets contain."""
    out = tmp_path_factory.mktemp("variants")
    paths = {
        "gray": out / "gray.JPEG",
        "cmyk": out / "cmyk.JPEG",
        "palette": out / "palette.png",
        "png_as_jpeg": out / "png_as_jpeg.JPEG",
        "gray16": out / "gray16.png",
    }
    _photo(1).convert("L").save(paths["gray"], "JPEG", quality=90)
    _photo(5).convert("CMYK").save(paths["cmyk"], "JPEG", quality=90)
    palette = _photo(2).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    # Per-entry alpha (a tRNS table, stored as bytes) is the case PIL warns about on a direct P->RGB.
    palette.save(paths["palette"], "PNG", transparency=bytes(range(0, 256, 32)))
    _photo(0).save(paths["png_as_jpeg"], "PNG")
    gray16 = np.asarray(_photo(2).convert("L")).astype(np.uint16) * 257
    Image.fromarray(gray16).save(paths["gray16"], "PNG")
    return paths


# --- the transform --------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", photo_paths(), ids=lambda p: p.name)
def test_eval_transform_equals_torchvision_preset_on_photographs(path):
    with Image.open(path) as image:
        reference = PRESET(image.convert("RGB"))
    ours = eval_transform()(load_rgb(path))
    assert ours.shape == (3, 224, 224) and ours.dtype == torch.float32
    assert torch.equal(ours, reference)


@pytest.mark.parametrize("kind", ["gray", "cmyk", "palette", "png_as_jpeg", "gray16"])
def test_eval_transform_equals_preset_on_converted_files(variants, kind):
    image = load_rgb(variants[kind])
    assert image.mode == "RGB"
    assert torch.equal(eval_transform()(image), PRESET(image))


def test_interpolation_setting_is_used():
    image = _photo(3)
    bicubic = ImageClassification(crop_size=224, resize_size=256, interpolation=InterpolationMode.BICUBIC)
    ours = eval_transform(interpolation="bicubic")(image)
    assert torch.equal(ours, bicubic(image))
    assert not torch.equal(ours, PRESET(image))
    assert eval_transform(resize=320, crop=288)(image).shape == (3, 288, 288)


def test_transform_from_zoo_config_matches_preset_and_takes_overrides():
    cfg = zoo.get_entry("resnet50v1_sn.in1k_8x32_cos120").eval
    image = _photo(4)
    assert torch.equal(eval_transform_from_config(cfg)(image), PRESET(image))
    # None leaves the entry's value, so optional CLI options can be passed through as they are.
    assert torch.equal(eval_transform_from_config(cfg, resize=None, crop=None)(image), PRESET(image))
    wide = eval_transform_from_config(cfg, resize=288, crop=256)(image)
    assert torch.equal(wide, ImageClassification(crop_size=256, resize_size=288)(image))


@pytest.mark.parametrize("call, fragment", [
    (lambda: eval_transform(interpolation="lanczos"), "unknown interpolation 'lanczos'; expected one of bilinear, bicubic, nearest"),
    (lambda: eval_transform(resize=0), "resize must be a positive"),
    (lambda: eval_transform(crop=256.0), "crop must be a positive"),
    (lambda: eval_transform(resize=224, crop=256), "crop 256 is larger than resize 224"),
    (lambda: eval_transform(mean=(0.5, 0.5)), "mean must be 3 numbers"),
    (lambda: eval_transform(std=(0.2, 0.0, 0.2)), "std must be positive"),
    (lambda: eval_transform_from_config(
        EvalConfig("imagenet", 256, 224, "bilinear", (0.5,) * 3, (0.5,) * 3), size=3), "unknown evaluation setting 'size'"),
])
def test_bad_transform_settings_are_one_line_errors(call, fragment):
    with pytest.raises(DataError) as err:
        call()
    assert fragment in str(err.value) and "\n" not in str(err.value)
    assert isinstance(err.value, SnzooError)


# --- decoding ---------------------------------------------------------------------------------------------


def test_grayscale_jpeg_becomes_equal_rgb_channels(variants):
    rgb = _pixels(load_rgb(variants["gray"]))
    with Image.open(variants["gray"]) as raw:
        assert raw.mode == "L"
        gray = _pixels(raw.convert("L"))
    assert rgb.shape == gray.shape + (3,)
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    assert np.array_equal(rgb[..., 0], gray)


def test_cmyk_jpeg_matches_pil_conversion_and_looks_like_the_photo(variants):
    with Image.open(variants["cmyk"]) as raw:
        assert raw.mode == "CMYK"
        expected = _pixels(raw.convert("RGB"))
    rgb = _pixels(load_rgb(variants["cmyk"]))
    assert np.array_equal(rgb, expected)
    # An inverted or channel-swapped decode would be far off the original colours.
    diff = np.abs(rgb.astype(int) - _pixels(_photo(5)).astype(int)).mean()
    assert diff < 10


def test_palette_png_with_transparency_is_deterministic_and_warning_free(variants):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first = _pixels(load_rgb(variants["palette"]))
    second = _pixels(load_rgb(variants["palette"]))
    with Image.open(variants["palette"]) as raw:
        assert raw.mode == "P" and isinstance(raw.info.get("transparency"), bytes)
        palette_colours = _pixels(raw.convert("RGBA"))[..., :3]
    assert np.array_equal(first, second) and np.array_equal(first, palette_colours)


def test_png_data_under_jpeg_name_is_read_by_content(variants):
    assert np.array_equal(_pixels(load_rgb(variants["png_as_jpeg"])), _pixels(_photo(0)))


def test_sixteen_bit_grayscale_is_scaled_not_clipped(variants):
    with Image.open(variants["gray16"]) as raw:
        assert raw.mode.startswith("I")
    rgb = _pixels(load_rgb(variants["gray16"]))
    gray = _pixels(_photo(2).convert("L"))
    assert np.array_equal(rgb[..., 0], gray) and np.array_equal(rgb[..., 2], gray)


def _truncated(path: Path) -> Path:
    data = photo_paths()[3].read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _garbage(path: Path) -> Path:
    path.write_bytes(b"<html>404 Not Found</html>\n" * 20)
    return path


@pytest.mark.parametrize("make, cause", [
    (_truncated, "truncated"),
    (_garbage, "cannot identify image file"),
    (lambda p: p, "No such file or directory"),
])
def test_unreadable_images_raise_bad_image_error_naming_the_file(tmp_path, make, cause):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    path = make(tmp_path / "ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(BadImageError) as err:
        load_rgb(path)
    message = str(err.value)
    assert str(path) in message and cause in message and "\n" not in message


# --- datasets ---------------------------------------------------------------------------------------------


@pytest.fixture
def imagenet_dir(tmp_path, variants) -> Path:
    """Three WordNet-id class folders of real photographs, mixed formats and extension case."""
    root = tmp_path / "val"
    files = {
        WNIDS[0]: [(photo_paths()[3], "b.JPEG"), (variants["gray"], "a gray.JPEG")],
        WNIDS[1]: [(photo_paths()[0], "c.png"), (variants["cmyk"], "d.JPG"), (photo_paths()[4], "sub/e.jpeg")],
        WNIDS[2]: [(variants["png_as_jpeg"], "f.JPEG"), (variants["palette"], "g.PNG")],
    }
    for wnid, items in files.items():
        for src, name in items:
            (root / wnid / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, root / wnid / name)
    (root / WNIDS[0] / "README.txt").write_text("not an image\n")
    (root / WNIDS[1] / "._c.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble resource fork")
    return root


def _expected_samples(root: Path) -> list[tuple[str, int]]:
    names = [(WNIDS[0], "a gray.JPEG"), (WNIDS[0], "b.JPEG"), (WNIDS[1], "c.png"), (WNIDS[1], "d.JPG"),
             (WNIDS[1], "sub/e.jpeg"), (WNIDS[2], "f.JPEG"), (WNIDS[2], "g.PNG")]
    return [(str(root / wnid / name), WNIDS.index(wnid)) for wnid, name in names]


def _list_file(root: Path, samples: list[tuple[str, int]]) -> Path:
    lines = [f"{Path(path).relative_to(root).as_posix()} {label}" for path, label in samples]
    list_file = root.parent / "val.txt"
    list_file.write_text("\n".join(lines[:3]) + "\n\n   \n" + "\n".join(lines[3:]) + "\n")
    return list_file


def test_image_folder_labels_order_and_transform(imagenet_dir):
    transform = eval_transform()
    ds = ImageFolderDataset(imagenet_dir, transform)
    assert ds.classes == list(WNIDS) and ds.num_classes == 3
    assert ds.samples == _expected_samples(imagenet_dir)
    assert len(ds) == 7
    for index in (0, 3, 6):
        image, label, returned_index = ds[index]
        assert returned_index == index and label == ds.samples[index][1]
        assert torch.equal(image, PRESET(load_rgb(ds.samples[index][0])))


def test_image_folder_matches_torchvision_image_folder_order(imagenet_dir):
    from torchvision.datasets import ImageFolder

    # ImageFolder takes the AppleDouble file for an image; without it the two listings must agree.
    (imagenet_dir / WNIDS[1] / "._c.png").unlink()
    theirs = ImageFolder(imagenet_dir)
    ours = ImageFolderDataset(imagenet_dir, None)
    assert ours.samples == theirs.samples and ours.classes == theirs.classes


def test_image_folder_with_model_class_list_uses_its_positions(imagenet_dir):
    names = ["n00000001", WNIDS[2], WNIDS[0], "n09999999", WNIDS[1]]
    ds = ImageFolderDataset(imagenet_dir, None, class_names=names)
    assert ds.num_classes == 5
    assert [label for _, label in ds.samples] == [2, 2, 4, 4, 4, 1, 1]
    assert ImageFolderDataset(imagenet_dir, None, class_names=3).num_classes == 3


def test_list_file_matches_folder(imagenet_dir):
    samples = _expected_samples(imagenet_dir)
    list_file = _list_file(imagenet_dir, samples)
    ds = ListFileDataset(list_file, imagenet_dir, eval_transform())
    assert ds.samples == [(str(imagenet_dir / Path(p).relative_to(imagenet_dir)), label) for p, label in samples]
    assert ds.num_classes == 3 and len(ds) == 7
    folder = ImageFolderDataset(imagenet_dir, eval_transform())
    for index in (0, 4):
        assert torch.equal(ds[index][0], folder[index][0]) and ds[index][1:] == folder[index][1:]
    assert ListFileDataset(list_file, imagenet_dir, None, num_classes=1000).num_classes == 1000


def test_build_eval_dataset_picks_the_layout(imagenet_dir):
    assert isinstance(build_eval_dataset(str(imagenet_dir), None), ImageFolderDataset)
    samples = _expected_samples(imagenet_dir)
    list_file = _list_file(imagenet_dir, samples)
    moved = imagenet_dir / "val.txt"
    shutil.copyfile(list_file, moved)
    by_default_root = build_eval_dataset(str(moved), None)
    assert isinstance(by_default_root, ListFileDataset) and by_default_root.samples == samples
    assert build_eval_dataset(str(list_file), None, root=imagenet_dir, class_names=list(WNIDS)).samples == samples
    with pytest.raises(DataError, match="is neither a folder nor a .txt list file"):
        build_eval_dataset(str(samples[0][0]), None)
    with pytest.raises(DataError, match="does not exist"):
        build_eval_dataset(str(imagenet_dir / "nope"), None)
    with pytest.raises(DataError, match="only applies to list files"):
        build_eval_dataset(str(imagenet_dir), None, root=imagenet_dir)
    with pytest.raises(DataError, match=r"line 3 .*: label 1 is out of range; expected 0 to 0 for a 1-class model"):
        build_eval_dataset(str(list_file), None, root=imagenet_dir, class_names=1)


def _photo_into(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(photo_paths()[6], path)


def _folder_case(tmp_path: Path, case: str) -> tuple[Path, dict]:
    root = tmp_path / "val"
    kwargs: dict = {}
    if case == "missing":
        pass
    elif case == "not_dir":
        root.write_text("x")
    elif case == "empty":
        root.mkdir()
    elif case == "flat":
        _photo_into(root / "ILSVRC2012_val_00000001.JPEG")
    elif case == "no_folders":
        root.mkdir()
        (root / "LICENSE").write_text("x")
    elif case == "empty_class":
        _photo_into(root / WNIDS[0] / "a.JPEG")
        (root / WNIDS[1]).mkdir()
        (root / WNIDS[1] / "notes.txt").write_text("x")
    elif case == "unknown_class":
        _photo_into(root / WNIDS[0] / "a.JPEG")
        _photo_into(root / "n99999999" / "a.JPEG")
        kwargs["class_names"] = list(WNIDS)
    elif case == "wrong_count":
        _photo_into(root / WNIDS[0] / "a.JPEG")
        kwargs["class_names"] = 1000
    return root, kwargs


@pytest.mark.parametrize("case, fragments", [
    ("missing", ["val does not exist", "expected one sub-folder per class, e.g. "]),
    ("not_dir", ["val is not a directory"]),
    ("empty", ["val is empty", "n01440764/*.JPEG"]),
    ("flat", ["holds 1 image(s) directly but no class folders", "expected one sub-folder per class"]),
    ("no_folders", ["has no class folders"]),
    ("empty_class", ["1 class folder(s)", f"val/{WNIDS[1]}", "hold no images"]),
    ("unknown_class", ["class folder", "val/n99999999 is not one of the model's 3 classes"]),
    ("wrong_count", ["has 1 class folders but the model has 1000 classes"]),
])
def test_bad_image_folders_are_one_line_errors(tmp_path, case, fragments):
    root, kwargs = _folder_case(tmp_path, case)
    with pytest.raises(DataError) as err:
        ImageFolderDataset(root, None, **kwargs)
    message = str(err.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize("content, fragments", [
    ("a.JPEG 0\nb.JPEG\n", ["line 2 'b.JPEG': missing label"]),
    ("a.JPEG 0\n\nb.JPEG seven\n", ["line 3 'b.JPEG seven': label 'seven' is not an integer"]),
    ("a.JPEG 1.5\n", ["line 1 'a.JPEG 1.5': label '1.5' is not an integer"]),
    ("a.JPEG -1\n", ["line 1 'a.JPEG -1': label -1 is negative"]),
    ("a.JPEG 0\nmissing one.JPEG 1\nb.JPEG 0\ngone.JPEG 2\n",
     ["2 of 4 files", "line 2 'missing one.JPEG 1'", "missing one.JPEG not found"]),
    ("\n  \n", ["has no samples"]),
])
def test_bad_list_files_are_one_line_errors(tmp_path, content, fragments):
    _photo_into(tmp_path / "a.JPEG")
    _photo_into(tmp_path / "b.JPEG")
    list_file = tmp_path / "val.txt"
    list_file.write_text(content)
    with pytest.raises(DataError) as err:
        ListFileDataset(list_file, tmp_path, None)
    message = str(err.value)
    assert "\n" not in message and str(list_file) in message
    for fragment in fragments:
        assert fragment in message


def test_missing_or_undecodable_list_file(tmp_path):
    with pytest.raises(DataError, match="does not exist or is not a file"):
        ListFileDataset(tmp_path / "val.txt", tmp_path, None)
    (tmp_path / "val.txt").write_bytes(b"a.JPEG \xff\xfe 0\n")
    with pytest.raises(DataError, match="cannot read list file .*expected UTF-8 text"):
        ListFileDataset(tmp_path / "val.txt", tmp_path, None)


# --- skipping unreadable images -----------------------------------------------------------------------------


@pytest.fixture
def folder_with_bad_images(imagenet_dir) -> tuple[Path, set[str]]:
    bad = {_truncated(imagenet_dir / WNIDS[0] / "c truncated.JPEG"), _garbage(imagenet_dir / WNIDS[2] / "e.JPEG")}
    return imagenet_dir, {str(p) for p in bad}


def test_bad_image_raises_without_skip_bad(folder_with_bad_images):
    root, bad = folder_with_bad_images
    ds = ImageFolderDataset(root, eval_transform())
    index = next(i for i, (path, _) in enumerate(ds.samples) if path in bad)
    with pytest.raises(BadImageError) as err:
        ds[index]
    assert ds.samples[index][0] in str(err.value)
    with pytest.raises(BadImageError):
        list(DataLoader(ds, batch_size=3, num_workers=2))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skip_bad_loader_yields_good_images_and_reports_skipped_paths(folder_with_bad_images, num_workers):
    root, bad = folder_with_bad_images
    ds = ImageFolderDataset(root, eval_transform(), skip_bad=True)
    assert len(ds) == 9
    loader = DataLoader(ds, batch_size=3, num_workers=num_workers, collate_fn=collate_skip_bad)
    seen, skipped = [], []
    for batch in loader:
        assert batch.images.shape[0] == batch.labels.shape[0] == batch.indices.shape[0]
        for image, label, index in zip(batch.images, batch.labels.tolist(), batch.indices.tolist()):
            path, expected_label = ds.samples[index]
            assert label == expected_label
            assert torch.equal(image, PRESET(load_rgb(path)))
            seen.append(index)
        skipped.extend(batch.skipped)
    assert {s.path for s in skipped} == bad and len(skipped) == 2
    assert all(s.path in s.reason and ds.samples[s.index][0] == s.path for s in skipped)
    assert sorted(seen + [s.index for s in skipped]) == list(range(len(ds)))
    assert not bad & {ds.samples[i][0] for i in seen}


def test_skip_bad_list_file_and_all_bad_batch(folder_with_bad_images):
    root, bad = folder_with_bad_images
    list_file = root / "bad.txt"
    list_file.write_text("".join(f"{Path(p).relative_to(root).as_posix()} 0\n" for p in sorted(bad)))
    ds = ListFileDataset(list_file, root, eval_transform(), skip_bad=True)
    batch = collate_skip_bad([ds[0], ds[1]])
    assert len(batch.labels) == 0 and batch.images.numel() == 0
    assert [s.path for s in batch.skipped] == sorted(bad)
    assert all(isinstance(s, Skipped) for s in batch.skipped)
