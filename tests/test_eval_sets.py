"""ImageNet-ReaL labels, logits restricted to a class subset, ImageNetV2's numbered folders and the robustness
suite, checked against counts made here from the model's own logits on real photographs."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import snzoo
from http_server import start_server
from photos import photo_paths
from snzoo.data import build_eval_dataset, eval_transform, imagenet_classes
from snzoo.errors import DataError, WeightsNotAvailableError
from snzoo.eval import REAL_SOURCE, evaluate_model, real_labels_file, with_diffs
from snzoo.zoo import Source
from snzoo_cli.main import cli

pytestmark = pytest.mark.usefixtures("one_thread")

CLASS_INDICES = (7, 281, 954)  # three ImageNet classes; ImageNet-R / -A style sets hold the first two
COUNT = 9
TRANSFORM = eval_transform()


def _val_name(number: int) -> str:
    return f"ILSVRC2012_val_{number:08d}.JPEG"


@pytest.fixture(scope="module")
def images() -> list[tuple[str, int, Image.Image]]:
    """(val file name, class index, image): real photographs, three per class, numbered in class order."""
    sources = [Image.open(p).convert("RGB") for p in photo_paths()]
    sources += [sources[0].transpose(Image.FLIP_LEFT_RIGHT), sources[3].transpose(Image.FLIP_LEFT_RIGHT)]
    return [(_val_name(100 + i), CLASS_INDICES[i // 3], sources[i]) for i in range(COUNT)]


def _folders(root: Path, images, name_of=lambda c: imagenet_classes()[c], classes=CLASS_INDICES) -> Path:
    for file_name, label, image in images:
        if label in classes:
            folder = root / name_of(label)
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / file_name, "JPEG", quality=92)
    return root


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = snzoo.create_model("resnet18v1_sn").eval()
    with torch.no_grad():  # the classes of the photos near the top, so the counts are neither 0 nor all
        model.fc.bias[list(CLASS_INDICES)] += torch.tensor([5.0, 4.0, 3.0])
    return model


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory) -> Path:
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("ckpt") / "r18-photos.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def val_folder(tmp_path_factory, images) -> Path:
    return _folders(tmp_path_factory.mktemp("imagenet") / "imagenet", images)


def _logits(model, folder: Path, class_names) -> tuple[list[str], list[int], torch.Tensor]:
    """Every image's file name, label and logits, computed here one image at a time."""
    dataset = build_eval_dataset(folder, TRANSFORM, class_names=class_names)
    names, labels, logits = [], [], []
    with torch.no_grad():
        for index in range(len(dataset)):
            image, label, _ = dataset[index]
            names.append(Path(dataset.samples[index][0]).name)
            labels.append(label)
            logits.append(model(image[None])[0])
    return names, labels, torch.stack(logits)


def _real_file(tmp_path: Path, sets: dict[str, list[int]]) -> Path:
    labels = [[] for _ in range(50_000)]
    for name, classes in sets.items():
        labels[int(name[15:23]) - 1] = classes
    path = tmp_path / "real.json"
    path.write_text(json.dumps(labels))
    return path


def test_real_accuracy_equals_an_independent_count(model, checkpoint, val_folder, images, tmp_path):
    names, labels, logits = _logits(model, val_folder, imagenet_classes())
    top5 = logits.topk(5, dim=1).indices.tolist()
    # Hand-made label sets: the true class, the true class plus the model's own second guess, another class only,
    # and one image with no label at all (left out of the ReaL count).
    sets = {}
    for i, (name, label) in enumerate(zip(names, labels)):
        sets[name] = [[label], [label, top5[i][1]], [top5[i][3]], []][i % 4]
    real_file = _real_file(tmp_path, sets)
    counted = [(row[0] in sets[n], any(c in sets[n] for c in row)) for n, row in zip(names, top5) if sets[n]]

    with pytest.warns(UserWarning, match="not the published real.json"):
        result = evaluate_model(checkpoint=checkpoint, arch="resnet18v1_sn", data=val_folder, real_labels=real_file,
                                workers=0, batch_size=4, progress=False)
    assert result.real["n"] == len(counted) == COUNT - COUNT // 4
    assert result.real["correct1"] == sum(c[0] for c in counted)
    assert result.real["correct5"] == sum(c[1] for c in counted)
    assert result.real["top1"] == pytest.approx(100.0 * sum(c[0] for c in counted) / len(counted))
    assert result.real["top5"] == pytest.approx(100.0 * sum(c[1] for c in counted) / len(counted))
    assert 0 < result.real["top1"] < 100
    # The standard accuracy is still the ground truth's.
    assert result.correct1 == sum(row[0] == label for row, label in zip(top5, labels))


@pytest.mark.filterwarnings("ignore:.*not the published real.json")
def test_real_label_file_errors_are_one_line(checkpoint, val_folder, tmp_path):
    short = tmp_path / "short.json"
    short.write_text(json.dumps([[1]] * 10))
    not_val = _folders(tmp_path / "renamed", [(f"photo{i}.jpg", c, im) for i, (_, c, im) in
                                               enumerate([(None, CLASS_INDICES[0], Image.new("RGB", (40, 40)))])])
    cases = [(short, val_folder, "holds 10 entries, expected a list of 50000"),
             (tmp_path / "missing.json", val_folder, "no such file"),
             (_real_file(tmp_path, {}), not_val, "keyed by ImageNet val file names")]
    for real, data, words in cases:
        with pytest.raises(DataError) as info:
            evaluate_model(checkpoint=checkpoint, arch="resnet18v1_sn", data=data, real_labels=real, workers=0)
        assert words in str(info.value) and "\n" not in str(info.value)


def test_published_labels_are_pinned_fetched_once_and_refused_when_wrong(tmp_path, monkeypatch):
    assert REAL_SOURCE.sha256 == "d83e9bff374c631aae8439eb064c7019acc56e1b3bc3f56b8380c2a710b0220b"
    assert REAL_SOURCE.size == 388_478 and REAL_SOURCE.url.endswith("reassessed-imagenet/master/real.json")
    with pytest.raises(WeightsNotAvailableError) as info:  # offline and not cached: where to put a copy
        real_labels_file()
    assert "real.json" in str(info.value) and "--real-labels" in str(info.value) and REAL_SOURCE.sha256 in str(info.value)

    served = tmp_path / "served"
    served.mkdir()
    body = json.dumps([[i % 1000] for i in range(50_000)]).encode()
    (served / "real.json").write_bytes(body)
    server = start_server(served)
    try:
        monkeypatch.delenv("SNZOO_OFFLINE")
        monkeypatch.delenv("HF_HUB_OFFLINE")
        pinned = Source(url=server.url("/real.json"), kind="https", format="original", file_name="real.json",
                        sha256=hashlib.sha256(body).hexdigest(), md5=None, size=len(body))
        first = real_labels_file(source=pinned)
        again = real_labels_file(source=pinned)
        assert first == again and first.read_bytes() == body and len(server.requests_for("/real.json")) == 1
        first.write_bytes(body[:-1] + b" ")  # a damaged cached copy is fetched again, never used
        assert real_labels_file(source=pinned).read_bytes() == body
        assert len(server.requests_for("/real.json")) == 2
        first.unlink()
        # The published pin against a file of the published size that is not the published one: refused by its
        # sha256, nothing cached.
        (served / "real.json").write_bytes(body.ljust(REAL_SOURCE.size, b" "))
        monkeypatch.setenv("SNZOO_MIRROR", server.url("/").rstrip("/"))
        with pytest.raises(WeightsNotAvailableError) as info:
            real_labels_file()
        assert "sha256" in str(info.value) and not first.exists()
    finally:
        server.close()


def test_logits_restricted_to_the_classes_in_the_data_equal_an_independent_count(model, checkpoint, images,
                                                                                   tmp_path):
    subset = CLASS_INDICES[:2]
    folder = _folders(tmp_path / "imagenet-r", images, classes=subset)
    _, labels, logits = _logits(model, folder, imagenet_classes())
    restricted = torch.tensor(subset)[logits[:, list(subset)].argmax(dim=1)]
    expected = int((restricted == torch.tensor(labels)).sum())
    result = evaluate_model(checkpoint=checkpoint, arch="resnet18v1_sn", data=folder, classes_in_data=True,
                            workers=0, progress=False)
    assert result.correct1 == expected and result.classes_evaluated == 2 and result.correct5 == result.n
    plain = evaluate_model(checkpoint=checkpoint, arch="resnet18v1_sn", data=folder, workers=0, progress=False)
    assert plain.classes_evaluated is None and plain.correct1 == int((logits.argmax(1) == torch.tensor(labels)).sum())
    assert expected >= plain.correct1  # fewer classes to confuse with


def test_imagenetv2_numbered_folders_are_class_indices(model, checkpoint, images, val_folder, tmp_path):
    folder = _folders(tmp_path / "v2", images, name_of=str)
    assert sorted(p.name for p in folder.iterdir()) == ["281", "7", "954"]  # not the class order when sorted
    numbered = evaluate_model(checkpoint=checkpoint, arch="resnet18v1_sn", data=folder, workers=0, progress=False,
                              per_class=True)
    named = evaluate_model(checkpoint=checkpoint, arch="resnet18v1_sn", data=val_folder, workers=0, progress=False)
    assert (numbered.correct1, numbered.correct5) == (named.correct1, named.correct5)
    assert set(numbered.per_class) == {str(c) for c in CLASS_INDICES}


def test_diffs_and_ranks_are_timms():
    base = [{"model": "a", "top1": 80.0, "top5": 95.0}, {"model": "b", "top1": 70.0, "top5": 90.0}]
    test = [{"model": "b", "top1": 50.0, "top5": 80.5}, {"model": "a", "top1": 40.0, "top5": 96.0},
            {"model": "c", "top1": 30.0, "top5": 60.0}]
    rows = with_diffs(test, base)
    assert [(r["top1_diff"], r["top5_diff"], r["rank_diff"]) for r in rows] == [
        ("-20.000", "-9.500", "+1"), ("-40.000", "+1.000", "-1"), ("", "", "")]


def test_robustness_suite_writes_every_results_file(model, checkpoint, images, val_folder, tmp_path):
    root = tmp_path / "sets"
    _folders(root / "imagenet", images)
    _folders(root / "imagenetv2-matched-frequency", images, name_of=str)
    _folders(root / "imagenet-sketch", images, classes=CLASS_INDICES)
    _folders(root / "imagenet-r", images, classes=CLASS_INDICES[:2])
    _folders(root / "imagenet-a", images, classes=CLASS_INDICES[1:])
    names, labels, logits = _logits(model, root / "imagenet", imagenet_classes())
    _real_file(root, {n: [label] for n, label in zip(names, labels)})  # ReaL = the ground truth here
    out = tmp_path / "results"
    out.mkdir()
    result = CliRunner().invoke(cli, ["eval", "--checkpoint", str(checkpoint), "--arch", "resnet18v1_sn", "--suite",
                                      "robustness", "--data-root", str(root), "--results-dir", str(out), "-j", "0"])
    assert result.exit_code == 0, result.output
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(f"results-{k}.csv" for k in (
        "imagenet", "imagenet-real", "imagenetv2-matched-frequency", "sketch", "imagenet-r-clean", "imagenet-r",
        "imagenet-a-clean", "imagenet-a"))
    table = {name[8:-4]: list(csv.DictReader((out / name).open())) for name in files}
    assert all(len(rows) == 1 and rows[0]["model"] == checkpoint.name for rows in table.values())
    top1 = {key: float(rows[0]["top1"]) for key, rows in table.items()}
    expected = 100.0 * float((logits.argmax(1) == torch.tensor(labels)).float().mean())
    assert top1["imagenet"] == top1["imagenet-real"] == top1["imagenetv2-matched-frequency"] == \
        top1["sketch"] == pytest.approx(expected, abs=1e-3)
    for key, base in (("imagenet-real", "imagenet"), ("sketch", "imagenet"), ("imagenet-r", "imagenet-r-clean"),
                      ("imagenet-a", "imagenet-a-clean")):
        row = table[key][0]
        assert float(row["top1_diff"]) == pytest.approx(top1[key] - top1[base], abs=2e-3) and row["rank_diff"] == "0"
    assert "top1_diff" not in table["imagenet"][0] and "top1_diff" not in table["imagenet-r-clean"][0]
    # The clean baseline and the set hold the same images here, so restricted to the same classes they agree.
    assert top1["imagenet-r"] == top1["imagenet-r-clean"] and top1["imagenet-a"] == top1["imagenet-a-clean"]


def test_suite_usage_errors_are_one_line(checkpoint, tmp_path):
    for options, words in ((["--suite", "robustness"], "--data-root"),
                           (["--suite", "robustness", "--data-root", str(tmp_path), "--data", "x"], "--data"),
                           (["--suite", "robustness", "--data-root", str(tmp_path)], "no test set found")):
        result = CliRunner().invoke(cli, ["eval", "--checkpoint", str(checkpoint), "--arch", "resnet18v1_sn",
                                          *options])
        assert result.exit_code != 0 and "Traceback" not in result.output and words in result.output
