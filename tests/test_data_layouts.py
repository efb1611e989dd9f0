"""ImageNet val in every layout users hold it in, built from the same real photographs: class folders, parquet
shards, a save_to_disk folder, webdataset shards, the official archives and the flat folder with the devkit.
Every layout must give the same labels, tensors, file names and accuracy; bad inputs are one-line errors."""

from __future__ import annotations

import io
import json
import pickle
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import snzoo
from photos import photo_paths
from snzoo.data import (
    BadImageError,
    DataError,
    eval_transform,
    imagenet_classes,
    open_imagenet_val,
    read_devkit,
    sample_file_name,
)
from snzoo.eval import evaluate

datasets = pytest.importorskip("datasets")
scipy_io = pytest.importorskip("scipy.io")
webdataset = pytest.importorskip("webdataset")

pytestmark = pytest.mark.usefixtures("one_thread")

# Three classes far apart in sorted order, so that a devkit-order mix-up cannot land on the right index.
CLASS_INDICES = (7, 281, 954)
WNIDS = tuple(imagenet_classes()[i] for i in CLASS_INDICES)
COUNT = 9
TRANSFORM = eval_transform()


def _name(number: int) -> str:
    return f"ILSVRC2012_val_{number:08d}.JPEG"


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def photos() -> list[tuple[str, int, bytes]]:
    """(file name, model class index, JPEG bytes), numbered in class-folder order so every layout agrees."""
    sources = [Image.open(p).convert("RGB") for p in photo_paths()]
    images = sources + [sources[0].transpose(Image.FLIP_LEFT_RIGHT), sources[3].transpose(Image.FLIP_LEFT_RIGHT)]
    order = sorted(range(COUNT), key=lambda i: (CLASS_INDICES[i % 3], i))
    return [(_name(n), CLASS_INDICES[i % 3], _jpeg(images[i])) for n, i in enumerate(order, start=1)]


@pytest.fixture(scope="module")
def permutation() -> list[int]:
    """ILSVRC2012_ID of each sorted class: a shuffle, as in the real devkit, with no class at its own place."""
    ids = np.random.default_rng(0).permutation(1000) + 1
    assert all(ids[i] != i + 1 for i in CLASS_INDICES)
    return [int(i) for i in ids]


def _meta_mat(permutation: list[int]) -> bytes:
    fields = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
    rows = [(permutation[j], wnid, f"class {j}", 0) for j, wnid in enumerate(imagenet_classes())]
    rows += [(1000 + k, f"n0000000{k}", "an ancestor synset", 3) for k in range(1, 4)]
    rows.sort(key=lambda row: row[0])
    synsets = np.array(rows, dtype=fields)
    buffer = io.BytesIO()
    scipy_io.savemat(buffer, {"synsets": synsets})
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _write_devkit(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            _add(tar, f"ILSVRC2012_devkit_t12/data/{name}", data)
    return path


def _ground_truth(photos, permutation) -> bytes:
    return "".join(f"{permutation[label]}\n" for _, label, _ in photos).encode()


@pytest.fixture(scope="module")
def layouts(tmp_path_factory, photos, permutation) -> dict[str, str]:
    """Every layout of the same photographs, keyed by layout; values are what a user passes as data."""
    root = tmp_path_factory.mktemp("layouts")
    found = {}
    folders = root / "folders"
    for name, label, data in photos:
        (folders / imagenet_classes()[label]).mkdir(parents=True, exist_ok=True)
        (folders / imagenet_classes()[label] / name).write_bytes(data)
    found["folders"] = str(folders)
    # The original's list file: paths relative to the list's folder, labels the class indices.
    (root / "val_list.txt").write_text("".join(f"folders/{imagenet_classes()[label]}/{name} {label}\n"
                                               for name, label, _ in photos))
    found["list"] = str(root / "val_list.txt")

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(imagenet_classes()))})
    rows = {"image": [{"bytes": d, "path": n} for n, _, d in photos], "label": [label for _, label, _ in photos]}
    table = datasets.Dataset.from_dict(rows, features=features)
    (root / "parquet" / "data").mkdir(parents=True)
    table.select(range(5)).to_parquet(str(root / "parquet/data/validation-00000-of-00002.parquet"))
    table.select(range(5, COUNT)).to_parquet(str(root / "parquet/data/validation-00001-of-00002.parquet"))
    table.select([0]).to_parquet(str(root / "parquet/data/train-00000-of-00001.parquet"))  # another split: ignored
    found["parquet"] = str(root / "parquet")

    # A ClassLabel of WordNet ids (in its own order) under other column names: mapped by name.
    names = [WNIDS[2], WNIDS[0], WNIDS[1]]
    by_name = datasets.Features({"img": datasets.Image(), "labels": datasets.ClassLabel(names=names)})
    saved = datasets.Dataset.from_dict(
        {"img": rows["image"], "labels": [names.index(imagenet_classes()[label]) for _, label, _ in photos]},
        features=by_name)
    datasets.DatasetDict({"validation": saved}).save_to_disk(str(root / "saved"))
    found["saved"] = str(root / "saved")

    for shard, part in enumerate((photos[:4], photos[4:])):
        with webdataset.TarWriter(str(root / f"imagenet1k-validation-{shard:04d}.tar")) as sink:
            for i, (name, label, data) in enumerate(part):
                sink.write({"__key__": f"s{shard}_{i:03d}", "jpg": data, "cls": str(label).encode(),
                            "json": json.dumps({"filename": name}).encode()})
    found["wds"] = str(root / "imagenet1k-validation-{0000..0001}.tar")

    official = root / "official"
    official.mkdir()
    with tarfile.open(official / "ILSVRC2012_img_val.tar", "w") as tar:
        for name, _, data in photos:
            _add(tar, name, data)
    _write_devkit(official / "ILSVRC2012_devkit_t12.tar.gz",
                  {"meta.mat": _meta_mat(permutation), "ILSVRC2012_validation_ground_truth.txt":
                   _ground_truth(photos, permutation)})
    found["archive"] = str(official / "ILSVRC2012_img_val.tar")

    flat = official / "val"
    flat.mkdir()
    for name, _, data in photos:
        (flat / name).write_bytes(data)
    found["flat"] = str(flat)  # the devkit lies in the folder above
    return found


@pytest.fixture(scope="module", autouse=True)
def _datasets_cache(tmp_path_factory):
    saved = datasets.config.HF_DATASETS_CACHE
    datasets.config.HF_DATASETS_CACHE = str(tmp_path_factory.mktemp("hf-datasets-cache"))
    datasets.disable_progress_bars()
    yield
    datasets.config.HF_DATASETS_CACHE = saved
    datasets.enable_progress_bars()


def _items(dataset) -> tuple[list[str], list[int], torch.Tensor]:
    names, labels, images = [], [], []
    for index in range(len(dataset)):
        image, label, position = dataset[index]
        assert position == index
        names.append(sample_file_name(dataset, index))
        labels.append(label)
        images.append(image)
    return names, labels, torch.stack(images)


@pytest.fixture(scope="module")
def reference(layouts, photos):
    dataset = open_imagenet_val(layouts["folders"], TRANSFORM)
    names, labels, images = _items(dataset)
    assert names == [n for n, _, _ in photos] and labels == [label for _, label, _ in photos]
    return names, labels, images


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = snzoo.create_model("resnet18v1_sn").eval()
    with torch.no_grad():
        model.fc.bias[list(CLASS_INDICES[:2])] += torch.tensor([6.0, 5.0])  # non-trivial top-1 and top-5
    return model


LAYOUTS = ("list", "parquet", "saved", "wds", "archive", "flat")
PREFIXED = {"parquet": "hfds:", "saved": "hfds:", "wds": "wds:", "archive": "archive:", "flat": "archive:"}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_gives_the_reference_files_labels_and_tensors(layout, layouts, reference):
    names, labels, images = reference
    for data in {layouts[layout], PREFIXED.get(layout, "") + layouts[layout]}:
        dataset = open_imagenet_val(data, TRANSFORM)
        assert dataset.num_classes == 1000 and list(dataset.classes) == list(imagenet_classes())
        got_names, got_labels, got_images = _items(dataset)
        assert got_names == names and got_labels == labels
        assert torch.equal(got_images, images)
    copy = pickle.loads(pickle.dumps(dataset))  # DataLoader workers may receive the dataset pickled
    assert torch.equal(copy[COUNT - 1][0], images[-1])


def test_accuracy_is_identical_in_every_layout(layouts, model):
    results = {}
    for layout in ("folders", *LAYOUTS):
        result = evaluate(model, open_imagenet_val(layouts[layout], TRANSFORM), workers=0, batch_size=COUNT)
        results[layout] = (result.n, result.correct1, result.correct5)
    assert set(results.values()) == {results["folders"]}, results
    n, correct1, correct5 = results["folders"]
    assert n == COUNT and 0 < correct1 <= correct5 < COUNT


def test_devkit_ids_are_mapped_through_meta_mat_not_used_as_indices(layouts, photos, permutation):
    truth = read_devkit(Path(layouts["archive"]).parent / "ILSVRC2012_devkit_t12.tar.gz")
    labels = [truth.label_of(name, name) for name, _, _ in photos]
    assert labels == [label for _, label, _ in photos]
    # Reading the devkit IDs as class indices (the classic mistake) would give other labels for every image.
    confused = [permutation[label] - 1 for _, label, _ in photos]
    assert all(a != b for a, b in zip(confused, labels))


def test_devkit_as_folder_or_ground_truth_file_with_meta_mat(layouts, photos, permutation, tmp_path):
    data = tmp_path / "ILSVRC2012_devkit_t12" / "data"
    data.mkdir(parents=True)
    (data / "meta.mat").write_bytes(_meta_mat(permutation))
    (data / "ILSVRC2012_validation_ground_truth.txt").write_bytes(_ground_truth(photos, permutation))
    expected = [label for _, label, _ in photos]
    for devkit in (data.parent, data / "ILSVRC2012_validation_ground_truth.txt"):
        dataset = open_imagenet_val(layouts["flat"], None, devkit=devkit)
        assert [label for _, label in dataset.samples] == expected


def _one_line_error(error_type, call, *fragments) -> str:
    with pytest.raises(error_type) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message and all(f in message for f in fragments), message
    return message


@pytest.fixture
def corrupt_shards(tmp_path, photos) -> str:
    for shard, part in enumerate((photos[:3], photos[3:5])):
        with tarfile.open(tmp_path / f"val-{shard}.tar", "w") as tar:
            for i, (name, label, data) in enumerate(part):
                broken = shard == 1 and i == 0
                _add(tar, f"k{shard}{i}.jpg", data[: len(data) // 3] if broken else data)
                _add(tar, f"k{shard}{i}.cls", str(label).encode())
    return str(tmp_path / "val-{0..1}.tar")


def test_corrupt_image_in_a_shard_stops_naming_it_or_is_skipped(corrupt_shards, model, tmp_path):
    dataset = open_imagenet_val(corrupt_shards, TRANSFORM)
    _one_line_error(BadImageError, lambda: dataset[3], "val-1.tar:k10", "cannot read image")
    _one_line_error(BadImageError, lambda: evaluate(model, dataset, workers=0), "val-1.tar:k10")
    result = evaluate(model, open_imagenet_val(corrupt_shards, TRANSFORM, skip_bad=True), workers=0)
    assert result.n == 4 and [s["path"] for s in result.skipped] == [f"{tmp_path}/val-1.tar:k10.jpg"]
    assert sample_file_name(dataset, 3) == "k10.jpg"


def test_bad_layouts_are_one_line_errors(layouts, photos, permutation, tmp_path):
    table = datasets.Dataset.from_dict({"image": [{"bytes": photos[0][2], "path": photos[0][0]}]},
                                       features=datasets.Features({"image": datasets.Image()}))
    table.to_parquet(str(tmp_path / "nolabel.parquet"))
    _one_line_error(DataError, lambda: open_imagenet_val(tmp_path / "nolabel.parquet", None),
                    "no label column", "label_column=")

    official = tmp_path / "official"
    official.mkdir()
    (official / "ILSVRC2012_img_val.tar").symlink_to(layouts["archive"])
    _write_devkit(official / "ILSVRC2012_devkit_t12.tar.gz",
                  {"ILSVRC2012_validation_ground_truth.txt": _ground_truth(photos, permutation)})
    _one_line_error(DataError, lambda: open_imagenet_val(official / "ILSVRC2012_img_val.tar", None),
                    "has no data/meta.mat")

    short = _ground_truth(photos[:-2], permutation)
    _write_devkit(official / "ILSVRC2012_devkit_t12.tar.gz",
                  {"meta.mat": _meta_mat(permutation), "ILSVRC2012_validation_ground_truth.txt": short})
    _one_line_error(DataError, lambda: open_imagenet_val(official, None), "has 7 ground-truth lines", "image 8")

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "labels.csv").write_text("a,b\n")
    for data in (tmp_path / "notes", tmp_path / "missing", "ILSVRC/imagenet-1k"):
        _one_line_error(DataError, lambda: open_imagenet_val(data, None), "expected one of", "parquet", "devkit")


def test_hub_id_offline_and_not_cached_is_one_clear_error():
    _one_line_error(DataError, lambda: open_imagenet_val("hfds:ILSVRC/imagenet-1k", None),
                    "not in the datasets cache", "offline")


def test_labels_that_cannot_be_mapped_and_missing_packages_are_one_line_errors(tmp_path, photos, monkeypatch):
    rows = {"image": [{"bytes": photos[0][2], "path": photos[0][0]}], "label": [0]}
    odd = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"])})
    datasets.Dataset.from_dict(rows, features=odd).save_to_disk(str(tmp_path / "pets"))
    _one_line_error(DataError, lambda: open_imagenet_val(tmp_path / "pets", None), "not WordNet ids")
    with tarfile.open(tmp_path / "wide.tar", "w") as tar:
        _add(tar, "a.jpg", photos[0][2])
        _add(tar, "a.cls", b"1000")
    _one_line_error(DataError, lambda: open_imagenet_val(tmp_path / "wide.tar", None), "wide.tar:a", "0 to 999")
    monkeypatch.setitem(sys.modules, "scipy.io", None)
    _one_line_error(DataError, lambda: read_devkit(tmp_path / "x.txt"), "does not exist")
    (tmp_path / "meta.mat").write_bytes(b"")
    (tmp_path / "gt.txt").write_text("1\n")
    _one_line_error(DataError, lambda: read_devkit(tmp_path / "gt.txt"), "pip install snzoo[data]")


# ------------------------------------------------------------------------------------------------ snzoo eval


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory) -> Path:
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("checkpoint") / "resnet18v1_sn-photos.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _cli_eval(checkpoint: Path, data: str, *options: str) -> dict:
    from click.testing import CliRunner

    from snzoo_cli.main import cli

    result = CliRunner().invoke(cli, ["eval", "--checkpoint", str(checkpoint), "--arch", "resnet18v1_sn",
                                      "--data", data, "-j", "0", "-b", "4", "--json", *options])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_snzoo_eval_reads_every_layout_with_the_same_result(layouts, checkpoint, model):
    expected = evaluate(model, open_imagenet_val(layouts["folders"], TRANSFORM), workers=0, batch_size=COUNT)
    for layout in ("folders", *LAYOUTS):
        for data in {layouts[layout], PREFIXED.get(layout, "") + layouts[layout]}:
            got = _cli_eval(checkpoint, data)
            assert (got["n"], got["correct1"], got["correct5"]) == (expected.n, expected.correct1, expected.correct5)
            assert got["config"]["data"] == data


def test_snzoo_eval_passes_split_columns_and_devkit_on(layouts, checkpoint, tmp_path):
    saved = _cli_eval(checkpoint, layouts["saved"], "--split", "validation", "--image-column", "img",
                      "--label-column", "labels")
    assert saved["n"] == COUNT
    # The flat folder moved away from its devkit: --devkit names it.
    moved = tmp_path / "val"
    moved.mkdir()
    for image in Path(layouts["flat"]).iterdir():
        (moved / image.name).write_bytes(image.read_bytes())
    devkit = Path(layouts["archive"]).parent / "ILSVRC2012_devkit_t12.tar.gz"
    with_devkit = _cli_eval(checkpoint, str(moved), "--devkit", str(devkit))
    assert (with_devkit["n"], with_devkit["correct1"]) == (saved["n"], saved["correct1"])


def test_snzoo_eval_layout_errors_are_one_line(layouts, checkpoint, tmp_path):
    from click.testing import CliRunner

    from snzoo_cli.main import cli

    cases = [
        (["--data", layouts["wds"], "--split", "validation"], "only applies to Hugging Face datasets"),
        (["--data", "wds:" + str(tmp_path / "none-{0000..0001}.tar")], "none-0000.tar"),
        (["--data", layouts["parquet"], "--label-column", "nope"], "nope"),
    ]
    for options, words in cases:
        result = CliRunner().invoke(cli, ["eval", "--checkpoint", str(checkpoint), "--arch", "resnet18v1_sn",
                                          "-j", "0", *options])
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], lines
    # A 10-class model cannot be scored on ImageNet val: said before anything is read.
    result = CliRunner().invoke(cli, ["eval", "resnet20_sn", "--data", layouts["wds"], "-j", "0"])
    assert result.exit_code == 1 and "1000 ImageNet classes, but the model has 10" in result.output
