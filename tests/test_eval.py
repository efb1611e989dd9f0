"""Evaluation: exact top-1 / top-5 accounting on real photographs, both layouts, the CLI, bad input."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms._presets import ImageClassification

import snzoo
from snzoo.data import BadImageError, DataError
from snzoo.eval import evaluate_model, imagenet_wnids
from snzoo.eval import evaluate
from snzoo.weights import cache_dir
from snzoo_cli.main import cli
from http_server import start_server
from photos import photo_paths
from test_fetch import entry_json

CLASSES = ["apple", "boat", "cat", "dog", "eel", "fig", "goat", "hat"]
WNIDS = ["n01440764", "n01443537", "n02123045"]  # class indices 0, 1 and 281 of ImageNet-1k


def _variants(path: Path) -> list[Image.Image]:
    image = Image.open(path).convert("RGB")
    w, h = image.size
    return [image, image.transpose(Image.FLIP_LEFT_RIGHT), image.crop((w // 8, h // 8, w - w // 8, h - h // 8))]


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory) -> Path:
    """Real photographs in 8 class folders, 2-3 images each, one grayscale and one CMYK JPEG among them."""
    root = tmp_path_factory.mktemp("photos") / "val"
    images = [v for p in photo_paths() for v in _variants(p)]
    for i, image in enumerate(images[:20]):
        folder = root / CLASSES[i % len(CLASSES)]
        folder.mkdir(parents=True, exist_ok=True)
        if i == 3:
            image.convert("L").save(folder / f"img{i:02d}.JPEG", quality=90)
        elif i == 4:
            image.convert("CMYK").save(folder / f"img{i:02d}.JPEG", quality=90)
        else:
            image.save(folder / f"img{i:02d}.JPEG", quality=90)
    return root


@pytest.fixture(scope="module")
def list_file(photo_folder) -> Path:
    lines = [f"{p.relative_to(photo_folder.parent).as_posix()} {CLASSES.index(p.parent.name)}"
             for p in sorted(photo_folder.rglob("*.JPEG"))]
    path = photo_folder.parent / "val_list.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def varied_model(seed: int, **kwargs) -> torch.nn.Module:
    """resnet18v1_sn with random weights whose predictions still vary from photograph to photograph."""
    torch.manual_seed(seed)
    model = snzoo.create_model("resnet18v1_sn", **kwargs)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("running_var"):
                tensor.fill_(1.0)
            if name.endswith(("mean_weight", "var_weight")):
                tensor.normal_()
    return model.eval()


@pytest.fixture(scope="module")
def small_model():
    return varied_model(3, num_classes=len(CLASSES))


def independent_counts(model, folder: Path, class_of) -> tuple[int, int, int]:
    """top-1 / top-5 hits computed here, with torchvision's own preset transform."""
    preset = ImageClassification(crop_size=224, resize_size=256, interpolation=InterpolationMode.BILINEAR)
    paths = sorted(folder.rglob("*.JPEG"))
    batch = torch.stack([preset(Image.open(p).convert("RGB")) for p in paths])
    labels = torch.tensor([class_of(p.parent.name) for p in paths])
    with torch.no_grad():
        logits = model(batch)
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    return int((top[:, 0] == labels).sum()), int((top == labels[:, None]).any(1).sum()), len(paths)


def save_checkpoint(model, path: Path) -> Path:
    torch.save({"epoch": 1, "state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, path)
    return path


def test_accounting_matches_independent_counts_in_both_layouts(small_model, photo_folder, list_file, tmp_path):
    ckpt = save_checkpoint(small_model, tmp_path / "small.pth")
    top1, top5, n = independent_counts(small_model, photo_folder, CLASSES.index)
    assert 0 < top5 < n  # a real, non-trivial test
    for data in (photo_folder, list_file):
        result = evaluate_model(data=data, checkpoint=ckpt, arch="resnet18v1_sn", workers=0, batch_size=6)
        assert (result.correct1, result.correct5, result.n) == (top1, top5, n)
        assert result.top1 == pytest.approx(100 * top1 / n) and result.top5 == pytest.approx(100 * top5 / n)
        assert result.config["resize"] == 256 and result.config["crop"] == 224
        assert result.checkpoint_sha256 == hashlib.sha256(ckpt.read_bytes()).hexdigest()


def test_imagenet_wordnet_folders_map_to_the_standard_class_indices(tmp_path, photo_folder):
    root = tmp_path / "imagenet-val"
    sources = sorted(photo_folder.rglob("*.JPEG"))
    for i, path in enumerate(sources[:9]):
        target = root / WNIDS[i % 3]
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / path.name)
    model = snzoo.create_model("resnet18v1_sn")  # 1000 classes
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.zero_()
        model.fc.bias[281] = 10.0  # n02123045: always the top prediction
        model.fc.bias[1] = 9.0
        model.fc.bias[0] = 8.0
    ckpt = save_checkpoint(model, tmp_path / "imagenet.pth")
    result = evaluate_model(data=root, checkpoint=ckpt, arch="resnet18v1_sn", workers=0, per_class=True)
    assert imagenet_wnids()[281] == "n02123045"
    assert result.n == 9 and result.correct1 == 3 and result.correct5 == 9
    assert result.per_class["n02123045"] == {"n": 3, "top1": 100.0}
    assert result.per_class["n01440764"] == {"n": 3, "top1": 0.0}
    (root / "n99999999").mkdir()
    shutil.copy(sources[0], root / "n99999999" / "x.JPEG")
    with pytest.raises(DataError, match="n99999999 is not one of the model's 1000 classes"):
        evaluate_model(data=root, checkpoint=ckpt, arch="resnet18v1_sn", workers=0)


def test_workers_channels_last_and_limit(small_model, photo_folder):
    dataset_result = evaluate(small_model, _dataset(photo_folder), workers=2, batch_size=4)
    cl = evaluate(small_model, _dataset(photo_folder), workers=0, batch_size=5, channels_last=True)
    assert (cl.correct1, cl.correct5, cl.n) == (dataset_result.correct1, dataset_result.correct5, dataset_result.n)
    limited = evaluate(small_model, _dataset(photo_folder), workers=0, limit=7)
    assert limited.n == 7 and limited.limit == 7


def evaluate_keeping_logits(model, dataset, **kwargs) -> tuple:
    """evaluate() as it is, plus the logits its own forward passes produced (read by a forward hook)."""
    outputs = []
    hook = model.register_forward_hook(lambda module, inputs, output: outputs.append(output.detach().clone()))
    try:
        result = evaluate(model, dataset, **kwargs)
    finally:
        hook.remove()
    return result, torch.cat(outputs)


def hit_counts(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    return int((top[:, 0] == labels).sum()), int((top == labels[:, None]).any(1).sum())


# bfloat16 keeps 8 significant bits (a relative step of 2**-8); over a ResNet-18's ~20 rounded layers the logits
# may drift by a few such steps of their own scale, not more.
BF16_LOGIT_TOLERANCE = 4 * 2**-8


def test_bfloat16_logits_and_accuracy_stay_within_bfloat16_rounding_of_float32(small_model, photo_folder):
    dataset = _dataset(photo_folder)
    labels = torch.tensor([item[1] for item in dataset])
    exact, exact_logits = evaluate_keeping_logits(small_model, dataset, workers=0, batch_size=6)
    bf16, bf16_logits = evaluate_keeping_logits(small_model, dataset, workers=0, batch_size=6, amp="bfloat16")
    # The captured logits are the ones each evaluation counted.
    assert hit_counts(exact_logits.float(), labels) == (exact.correct1, exact.correct5)
    assert hit_counts(bf16_logits.float(), labels) == (bf16.correct1, bf16.correct5)
    assert exact_logits.dtype == torch.float32 and bf16_logits.dtype == torch.bfloat16
    assert exact.n == bf16.n == len(labels)

    tolerance = BF16_LOGIT_TOLERANCE * float(exact_logits.abs().max())
    error = (bf16_logits.float() - exact_logits).abs().max().item()
    assert 0 < error <= tolerance, f"bfloat16 logits differ by {error:.3g}, tolerance {tolerance:.3g}"
    # With every logit within the tolerance, top-1 can only change where float32's top-1 leads the runner-up
    # by at most twice the tolerance (both may move by it); no other image may change its verdict.
    best_two = exact_logits.topk(2, dim=1).values
    close_calls = int((best_two[:, 0] - best_two[:, 1] <= 2 * tolerance).sum())
    assert close_calls < len(labels)  # the bound below says something
    assert abs(bf16.correct1 - exact.correct1) <= close_calls


def _dataset(folder):
    from snzoo.data import build_eval_dataset, eval_transform

    return build_eval_dataset(folder, eval_transform(), class_names=len(CLASSES))


def test_class_count_mismatch_is_one_clear_error(photo_folder, tmp_path):
    model = snzoo.create_model("resnet18v1_sn", num_classes=10)
    ckpt = save_checkpoint(model, tmp_path / "ten.pth")
    with pytest.raises(DataError, match="8 class folders but the model has 10 classes"):
        evaluate_model(data=photo_folder, checkpoint=ckpt, arch="resnet18v1_sn", workers=0)


def test_corrupt_image_stops_the_run_or_is_skipped(small_model, photo_folder, tmp_path):
    root = tmp_path / "val"
    shutil.copytree(photo_folder, root)
    good = sorted(root.rglob("*.JPEG"))[0]
    bad = root / CLASSES[0] / "broken.JPEG"
    bad.write_bytes(good.read_bytes()[:2000])
    ckpt = save_checkpoint(small_model, tmp_path / "m.pth")
    for workers in (0, 2):
        with pytest.raises(BadImageError) as info:
            evaluate_model(data=root, checkpoint=ckpt, arch="resnet18v1_sn", workers=workers)
        assert str(bad) in str(info.value) and "\n" not in str(info.value)
    result = evaluate_model(data=root, checkpoint=ckpt, arch="resnet18v1_sn", workers=2, skip_bad=True)
    assert [s["path"] for s in result.skipped] == [str(bad)]
    assert result.n == len(list(photo_folder.rglob("*.JPEG")))


@pytest.fixture
def served_entry(small_model, tmp_path, monkeypatch):
    """A zoo entry (overlay) whose checkpoint is served by a real HTTP server on 127.0.0.1."""
    monkeypatch.delenv("SNZOO_OFFLINE")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    served = tmp_path / "served"
    served.mkdir()
    ckpt = save_checkpoint(small_model, served / "small.pth")
    sha256 = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    with start_server(served) as server:
        entry = entry_json(server.url("small.pth"), sha256=sha256, file_name="small.pth")
        entry.update(num_classes=len(CLASSES), metrics={"photos-val": {"top1": 50.0, "top5": 90.0}})
        entry["eval"]["dataset"] = "photos-val"
        overlay = tmp_path / "overlay.json"
        overlay.write_text(json.dumps({"schema_version": 1, "entries": {"resnet18v1_sn.photos_test": entry}}))
        yield overlay, sha256


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_cli_eval_end_to_end_over_http_with_json(served_entry, small_model, photo_folder, tmp_path):
    overlay, sha256 = served_entry
    top1, top5, n = independent_counts(small_model, photo_folder, CLASSES.index)
    result = run("--manifest", overlay, "eval", "resnet18v1_sn.photos_test", "--data", photo_folder,
                 "--json", "-j", "0", "--results-file", tmp_path / "results.csv")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert (report["correct1"], report["correct5"], report["n"]) == (top1, top5, n)
    assert report["published"]["top1"] == 50.0
    assert report["published"]["top1_diff"] == pytest.approx(100 * top1 / n - 50.0)
    assert report["checkpoint_sha256"] == sha256 and report["config"]["interpolation"] == "bilinear"
    text = run("--manifest", overlay, "eval", "resnet18v1_*", "--data", photo_folder, "--limit", "5", "-j", "0",
               "--results-file", tmp_path / "results.csv")
    assert text.exit_code == 0, text.output
    assert "resnet18v1_sn.photos_test: top-1" in text.output and "on 5 images (first 5 only)" in text.output
    assert "published 50.00 / 90.00" in text.output
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["n"] for r in rows] == [str(n), "5"]
    assert list(rows[0])[:9] == ["model", "top1", "top1_err", "top5", "top5_err", "param_count", "img_size",
                                  "crop_pct", "interpolation"]
    assert float(rows[0]["top1"]) + float(rows[0]["top1_err"]) == pytest.approx(100.0)
    assert rows[0]["img_size"] == "224" and rows[0]["crop_pct"] == "0.875"


def test_cli_eval_overrides_and_json_results_file(served_entry, photo_folder, tmp_path):
    overlay, _ = served_entry
    out = tmp_path / "results.json"
    for _ in range(2):
        result = run("--manifest", overlay, "eval", "resnet18v1_sn.photos_test", "--data", photo_folder, "--json",
                     "-j", "0", "--resize", "160", "--crop", "128", "--interpolation", "bicubic", "--results-file", out)
        assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert (report["config"]["resize"], report["config"]["crop"], report["config"]["interpolation"]) == (160, 128, "bicubic")
    rows = json.loads(out.read_text())
    assert len(rows) == 2 and rows[0]["img_size"] == 128 and rows[0]["interpolation"] == "bicubic"


@pytest.mark.parametrize("make_data,expected", [
    (lambda tmp: tmp / "absent", "does not exist"),
    (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", "is empty"),
    (lambda tmp: _loose_images(tmp), "no class folders"),
    (lambda tmp: _bad_list(tmp), "line 2"),
])
def test_cli_eval_bad_data_is_one_line(make_data, expected, small_model, tmp_path):
    ckpt = save_checkpoint(small_model, tmp_path / "m.pth")
    data = make_data(tmp_path)
    result = run("eval", "--checkpoint", ckpt, "--arch", "resnet18v1_sn", "--data", data, "-j", "0")
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and result.output.startswith("error: ") and expected in result.output


def _loose_images(tmp: Path) -> Path:
    folder = tmp / "loose"
    folder.mkdir()
    shutil.copy(photo_paths()[3], folder / "rocket.jpg")
    return folder


def _bad_list(tmp: Path) -> Path:
    shutil.copy(photo_paths()[3], tmp / "rocket.jpg")
    path = tmp / "list.txt"
    path.write_text("rocket.jpg 1\nrocket.jpg one\n")
    return path


def test_cli_eval_needs_a_model():
    result = run("eval", "--data", ".")
    assert result.exit_code == 2 and "name a zoo entry" in result.output


def test_snzoo_evaluate_is_the_engine(small_model, photo_folder):
    result = snzoo.evaluate(small_model, _dataset(photo_folder), workers=0, per_class=True)
    assert isinstance(result, snzoo.EvalResult) and result.n == 20
    assert sum(c["n"] for c in result.per_class.values()) == 20


@pytest.mark.parametrize("make_data", [
    pytest.param(lambda tmp: tmp / "typo", id="missing-folder"),
    pytest.param(lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", id="empty-folder"),
    pytest.param(lambda tmp: _bad_list(tmp), id="malformed-list-file"),
])
def test_cli_eval_checks_the_data_before_downloading_the_weights(make_data, small_model, photo_folder, tmp_path,
                                                                 monkeypatch):
    monkeypatch.delenv("SNZOO_OFFLINE")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    served = tmp_path / "served"
    served.mkdir()
    ckpt = save_checkpoint(small_model, served / "small.pth")
    entry = entry_json("", sha256=hashlib.sha256(ckpt.read_bytes()).hexdigest(), file_name="small.pth")
    entry["num_classes"] = len(CLASSES)
    data = make_data(tmp_path)
    with start_server(served) as server:
        entry["sources"][0]["url"] = server.url("small.pth")
        overlay = tmp_path / "overlay.json"
        overlay.write_text(json.dumps({"schema_version": 1, "entries": {"resnet18v1_sn.photos_test": entry}}))
        bad = run("--manifest", overlay, "eval", "resnet18v1_sn.photos_test", "--data", data, "-j", "0")
        assert bad.exit_code == 1 and bad.output.startswith("error: ") and bad.output.count("\n") == 1, bad.output
        assert server.requests == []
        assert not cache_dir().exists() or not any(cache_dir().iterdir())
        # The same command with readable data does download: the server above would have seen a request.
        good = run("--manifest", overlay, "eval", "resnet18v1_sn.photos_test", "--data", photo_folder,
                   "--limit", "2", "-j", "0", "-q")
        assert good.exit_code == 0, good.output
        assert server.requests_for("/small.pth")
