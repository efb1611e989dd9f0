"""`snzoo finetune --task detection|segmentation` and `snzoo eval --task`, end to end on real-image scenes.

Garments of the Fashion-MNIST test set pasted onto real photographs (tests/scenes.py) give detection and
segmentation data whose every box and mask is known; the backbone comes from a zoo entry (an overlay entry with a
local weights file, the way a published entry is fetched and verified).
"""

import json
from pathlib import Path
from statistics import mean

import pytest
import torch
from click.testing import CliRunner

import snzoo
from snzoo import zoo
from snzoo.data.fashion_mnist import FashionMNIST
from snzoo.tasks import load_task_model
from snzoo.train import read_metrics
from snzoo.weights import hash_file, write_safetensors
from snzoo_cli.main import cli

from scenes import make_scenes, write_coco, write_segmentation
from test_train import snzoo_train

pytestmark = pytest.mark.usefixtures("one_thread")

BACKBONE = "resnet18v1_sn.scenes_1x8_test"
# Small images and few sampled anchors / RoIs keep a step well under a second on a CPU core.
DETECTION_SETTINGS = ["--set", "model_kwargs.min_size=128", "--set", "model_kwargs.max_size=160",
                      "--set", "model_kwargs.rpn_batch_size_per_image=64",
                      "--set", "model_kwargs.box_batch_size_per_image=64",
                      "--set", "model_kwargs.rpn_post_nms_top_n_train=300",
                      "--set", "model_kwargs.box_detections_per_img=20"]


@pytest.fixture(scope="module")
def scenes_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    write_coco(make_scenes(24, seed=1), root / "coco", "train")
    write_coco(make_scenes(6, seed=2), root / "coco", "val")
    write_segmentation(make_scenes(16, seed=3), root / "seg", "train")
    write_segmentation(make_scenes(6, seed=4), root / "seg", "val")
    return root


@pytest.fixture(scope="module")
def backbone_overlay(tmp_path_factory):
    """A zoo entry for a resnet18v1_sn backbone whose weights are a local file (sha256 pinned)."""
    folder = tmp_path_factory.mktemp("backbone")
    torch.manual_seed(0)
    model = snzoo.create_model("resnet18v1_sn", num_classes=10)
    weights = folder / "backbone.safetensors"
    write_safetensors(model.state_dict(), weights)
    base = zoo.get_entry("resnet50v1_sn.in1k_8x4_step100").to_dict()
    base.pop("name")
    base.update(architecture="resnet18v1_sn", default=True, num_classes=10, notes=[])
    base["metrics"] = {"scenes": {"top1": None, "top5": None}}
    base["sources"] = [{"url": weights.as_uri(), "kind": "file", "format": "safetensors", "file_name": weights.name,
                        "sha256": hash_file(weights).sha256, "md5": None, "size": None}]
    overlay = folder / "overlay.json"
    overlay.write_text(json.dumps({"schema_version": 1, "entries": {BACKBONE: base}}))
    return overlay, model.state_dict()


@pytest.fixture
def with_backbone(backbone_overlay, monkeypatch):
    overlay, state = backbone_overlay
    monkeypatch.setenv("SNZOO_MANIFEST", str(overlay))
    zoo.set_overlay(overlay)
    return state


def invoke(args: list) -> str:
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout  # progress goes to stderr


def train_losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if r["split"] == "train"]


def test_detection_finetune_from_an_entry_then_eval(scenes_root, with_backbone, tmp_path):
    run = tmp_path / "det"
    summary = json.loads(invoke([
        "finetune", BACKBONE, "--task", "detection", "--data", scenes_root / "coco", "-o", run,
        "--batch", "1x2", "--lr", "0.02", "--set", "iterations=40", "--set", "schedule.warmup_iters=4",
        "--log-every", "1", "-j", "0", "--json", *DETECTION_SETTINGS]))
    assert summary["steps"] == 40 and not summary["stopped_early"]
    losses = train_losses(run)
    assert len(losses) == 40
    assert mean(losses[-10:]) < 0.75 * mean(losses[:4]), losses  # the loss falls
    # Validation ran pycocotools: all 12 box statistics.
    box = summary["val"]["box"]
    assert set(box) == {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"}
    assert all(-1 <= v <= 100 for v in box.values())

    # The exported entry rebuilds the model without fetching the backbone, and its weights fit.
    model, entry = load_task_model(run)
    assert entry["task"] == "detection" and entry["model"] == "fasterrcnn_resnet_fpn_sn"
    assert entry["backbone"] == BACKBONE and entry["num_classes"] == 11
    assert entry["classes"][1:] == list(FashionMNIST.classes)
    # The frozen stem kept the entry's weights; a trained stage moved away from them.
    assert torch.equal(model.backbone.body.conv1.weight, with_backbone["conv1.weight"])
    assert not torch.equal(model.backbone.body.layer4[0].conv1.weight, with_backbone["layer4.0.conv1.weight"])

    # `snzoo eval --task detection` on the val split gives the run's own validation numbers.
    evaluated = json.loads(invoke(["eval", run, "--task", "detection", "--data", scenes_root / "coco", "--json",
                                   "-q", "--results-file", tmp_path / "results.csv"]))
    assert evaluated["box"] == pytest.approx(box, abs=1e-9)
    rows = (tmp_path / "results.csv").read_text().splitlines()
    assert rows[0].startswith("model,task,dataset,n,box_AP,") and len(rows) == 2

    # entry.json is manifest-ready: as an overlay the run joins the zoo, and its name is enough.
    name = entry["name"]
    zoo.set_overlay(run / "entry.json")
    assert name in invoke(["--manifest", run / "entry.json", "list", "--task", "detection"])
    by_name, _ = load_task_model(name)  # the weights fetched into the cache and verified like any zoo weights
    for key, value in model.state_dict().items():
        assert torch.equal(value, by_name.state_dict()[key]), key
    by_name_eval = json.loads(invoke(["--manifest", run / "entry.json", "eval", name, "--task", "detection",
                                      "--data", scenes_root / "coco", "--json", "-q"]))
    assert by_name_eval["box"] == pytest.approx(box, abs=1e-9)


def test_segmentation_finetune_from_an_entry_then_eval(scenes_root, with_backbone, tmp_path):
    run = tmp_path / "seg"
    summary = json.loads(invoke([
        "finetune", BACKBONE, "--task", "segmentation", "--data", scenes_root / "seg", "-o", run,
        "--batch", "1x4", "--lr", "0.01", "--epochs", "6", "--set", "augmentation.crop=96",
        "--set", "model_kwargs.output_stride=16", "--log-every", "1", "-j", "0", "--json"]))
    assert summary["steps"] == 6 * (16 // 4)
    losses = train_losses(run)
    assert mean(losses[-4:]) < 0.75 * mean(losses[:2]), losses
    val = summary["val"]
    assert 0 <= val["miou"] <= 100 and 0 <= val["pixel_accuracy"] <= 100
    assert len(val["per_class_iou"]) == 11

    model, entry = load_task_model(run)
    assert entry["task"] == "segmentation" and entry["model"] == "deeplabv3_resnet_sn"
    evaluated = json.loads(invoke(["eval", run / "entry.json", "--task", "segmentation", "--data",
                                   scenes_root / "seg", "--json", "-q"]))
    assert evaluated["miou"] == pytest.approx(val["miou"], abs=1e-9)
    assert evaluated["pixel_accuracy"] == pytest.approx(val["pixel_accuracy"], abs=1e-9)


@pytest.mark.parametrize("sync, model", [(False, "fasterrcnn_resnet_fpn_sn"), (True, "maskrcnn_resnet_fpn_sn")],
                         ids=["per-device", "sync-stats"])
def test_two_process_detection_finetune(scenes_root, backbone_overlay, tmp_path, sync, model):
    overlay, _ = backbone_overlay
    run = tmp_path / "run"
    args = ["finetune", BACKBONE, "--task", "detection", "--model", model, "--data", scenes_root / "coco", "-o", run,
            "--batch", "2x2", "--lr", "0.01", "--set", "iterations=4", "--val-subset", "2", "-j", "0",
            "--sync-stats" if sync else "--no-sync-stats", *DETECTION_SETTINGS]
    proc = snzoo_train(args, nproc=2, module="snzoo", env_extra={"SNZOO_MANIFEST": str(overlay)})
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[:4000]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4 and "2 process(es)" in summary["plan"]
    assert ("synchronised over all 4 images" in summary["plan"]) == sync
    # Validation ran on rank 0: box AP, and mask AP for Mask R-CNN, every COCO statistic.
    assert len(summary["val"]["box"]) == 12 and len(summary["val"].get("mask", ())) == (12 if sync else 0)
    built, entry = load_task_model(run)
    assert entry["model"] == model
    assert all(torch.isfinite(t).all() for t in built.state_dict().values() if t.is_floating_point())


@pytest.mark.parametrize("args, message", [
    (["--task", "detection", "--data", "{seg}"], "annotations"),
    (["--task", "segmentation", "--data", "{coco}"], "SegmentationClass"),
    (["--task", "detection", "--model", "yolo_sn", "--data", "{coco}"], "unknown detection model 'yolo_sn'"),
    (["--task", "detection", "--freeze", "layer1", "--data", "{coco}"], "for classification"),
])
def test_bad_task_finetunes_are_one_line(scenes_root, with_backbone, tmp_path, args, message):
    args = [a.format(seg=scenes_root / "seg", coco=scenes_root / "coco") for a in args]
    result = CliRunner().invoke(cli, ["finetune", BACKBONE, "-o", str(tmp_path / "run"), *args])
    assert result.exit_code != 0
    assert message in result.output and "Traceback" not in result.output, result.output
    assert not (tmp_path / "run").exists()


def test_eval_task_needs_a_task_entry(scenes_root, tmp_path):
    result = CliRunner().invoke(cli, ["eval", str(tmp_path), "--task", "detection", "--data",
                                      str(scenes_root / "coco")])
    assert result.exit_code != 0 and "no task entry there" in result.output


def test_one_process_emulates_devices_with_ghost_batches_in_the_backbone(scenes_root, with_backbone, tmp_path):
    from snzoo.train import finetune

    summary = finetune(BACKBONE, str(scenes_root / "coco"), tmp_path / "run", task="detection", epochs=None,
                       batch="2x2", lr=0.01, overrides=["iterations=2", *DETECTION_SETTINGS[1::2]], workers=0,
                       val_subset=1, progress=False)
    assert "BN statistics over ghost batches of 2 (2 emulated devices per process)" in summary["plan"]
    model, entry = load_task_model(tmp_path / "run")
    assert entry["model_kwargs"]["using_bn"] is True  # two images per device keep the BN term


def test_ghost_batches_reach_the_backbone_and_fpn_only():
    from snzoo.detection import maskrcnn_resnet_fpn_sn
    from snzoo.nn import set_ghost_batch_size, switchnorm_layers
    from snzoo.train._tasks import task_adapter
    from photos import photo_batch

    torch.manual_seed(0)
    model = maskrcnn_resnet_fpn_sn(num_classes=3, backbone="resnet18v1_sn", pretrained_backbone=False,
                                   using_bn=True, trainable_layers=5)
    set_ghost_batch_size(task_adapter("detection").ghost_scope(model), 2)
    assert {layer.ghost_batch_size for layer in switchnorm_layers(model.backbone)} == {2}
    assert {layer.ghost_batch_size for layer in switchnorm_layers(model.roi_heads)} == {None}
    # In training, a batch of 4 images gives each pair the features it gets alone: statistics per emulated device.
    images = photo_batch(size=64, count=4)
    backbone = model.backbone.train()
    together = backbone(images)
    apart = [backbone(images[i:i + 2]) for i in (0, 2)]
    for key in together:
        assert torch.allclose(together[key], torch.cat([a[key] for a in apart]), atol=1e-5), key


def test_detection_resume_equals_an_uninterrupted_run_and_plots(scenes_root, with_backbone, tmp_path):
    common = ["finetune", BACKBONE, "--task", "detection", "--data", scenes_root / "coco", "--batch", "1x2",
              "--set", "iterations=4", "--val-subset", "2", "-j", "0", "--deterministic", *DETECTION_SETTINGS]
    invoke([*common, "-o", tmp_path / "whole"])
    invoke([*common, "-o", tmp_path / "parts", "--max-steps", "2"])
    invoke([*common, "-o", tmp_path / "parts", "--resume"])
    whole, parts = (load_task_model(tmp_path / name)[0].state_dict() for name in ("whole", "parts"))
    assert whole.keys() == parts.keys()
    for key in whole:
        assert torch.equal(whole[key], parts[key]), key
    plots = invoke(["plot", tmp_path / "whole"])
    assert (tmp_path / "whole" / "plots" / "box_AP.png").is_file() and "box_AP.png" in plots


def test_task_finetune_from_a_checkpoint_file(scenes_root, backbone_overlay, tmp_path):
    """--init FILE: an architecture without zoo weights, its weights from a file the user holds."""
    overlay, state = backbone_overlay
    checkpoint = overlay.parent / "backbone.safetensors"
    invoke(["finetune", "resnet18v1_sn", "--task", "detection", "--init", checkpoint, "--data", scenes_root / "coco",
            "-o", tmp_path / "run", "--batch", "1x2", "--set", "iterations=2", "--val-subset", "1", "-j", "0",
            *DETECTION_SETTINGS])
    model, entry = load_task_model(tmp_path / "run")
    assert entry["backbone"] == "resnet18v1_sn" and "weights" in entry["notes"][0]
    assert torch.equal(model.backbone.body.conv1.weight, state["conv1.weight"])  # frozen: still the file's
