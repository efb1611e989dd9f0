"""The weights manifest, its validation, overlays and the zoo lookups."""

from __future__ import annotations

import copy
import json
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
import torch
from torch import nn

from snzoo import zoo
from snzoo.errors import ManifestError, UnknownModelError
from snzoo.models import registry
from snzoo.nn import SparseSwitchNorm2d, SwitchNorm2d
from snzoo.nn.ghost_batchnorm import GhostBatchNorm2d

GD = "https://drive.google.com/uc?id="
SHIPPED_COUNT = len(zoo.load_manifest())  # the 12 published entries plus snzoo's own
SHIPPED = "weights_manifest.json"

# The reference zoo table: name -> (top1, top5, Google Drive id, md5 or None).
PUBLISHED = {
    "resnet101v2_sn.in1k_8x32_cos120": (78.81, 94.16, "1z-F1nc7T-cdEM-HtYDALW0pJGPX0-RkS", None),
    "resnet101v1_sn.in1k_8x32_cos120": (78.54, 94.10, "1xza5ju6lRRelPym3Sj99VY_8c4jXhxkn", None),
    "resnet50v2_sn.in1k_8x32_cos120": (77.57, 93.65, "1CjLURwDkynhiXoKjYxUyEIOnWDPVmPnL", None),
    "resnet50v1_sn.in1k_8x32_cos120": (77.49, 93.32, "17mHmoVom2zM7nrbFeE4yzKa7KtqykTyD", None),
    "resnet50v1_sn.in1k_8x32_step100": (76.92, 93.26, "1lOTzjgX6B9J9gkm8JdxaWGBKC1T9VLsl", None),
    "resnet50v1_sn.in1k_8x4_step100": (75.85, 92.70, "1x_ZR0ZFtvRzZHkFZVXeVoLeXoJKX-LrZ", None),
    "resnet50v1_sn.in1k_8x1_step100": (75.94, 92.70, "1-y8dDn19Hx02efy4Z5ZRihggYHTYvqkc", None),
    "resnet50v1_ssn.in1k_8x32_step100": (77.25, 93.29, "1b7tezVjfSl1MZNHRC8qkaw59lLW4EYEh",
                                         "5c9fb111577b040e62461db51ffce69b"),
    "resnet50v1_ssn.in1k_8x16_step100": (76.98, 93.29, "1wJx_6bNrv7N9zdy1m2vkABTwMuowluxV",
                                         "d7085632529a9b1945a28a4d3bf4cacb"),
    "resnet50v1_ssn.in1k_8x8_step100": (76.75, 93.33, "18HXLmZVB5JF_TcneEMHXtCo1RQt17fYC",
                                        "af85a39920644421fc48e216aba6ff0e"),
    "resnet50v1_ssn.in1k_8x4_step100": (76.07, 96.71, "1Ry4kjLURixg2_pzj6J1lwGg1USnSC0oz",
                                        "949d4bd54a7c63a3371b941eb4d3ea69"),
    "resnet50v1_ssn.in1k_8x2_step100": (75.85, 92.73, "1r485fLeSAwS5zKrxcAtGxa_mPr1lWcoS",
                                        "dadb0f1a0c49c31aedd6cb83d4996a03"),
}
# The detection release's backbones: name -> (Drive id of the FPN-keyed file, of the plain file, using_bn, the
# paper's table top-1 for SN at that batch, which is not a measurement of these files).
DETECTRON_RELEASE = {
    "resnet50v1_sn.in1k_8x2_detectron": ("1b0ia4AnSGL__8pAKG-n4w3CSeYCjlNwe", "1U_nftWTUqcjfprSY8w9FRYTjwWnD5nLN",
                                         True, "75.6"),
    "resnet50v1_sn.in1k_8x1_detectron": ("16-6MGOHFkwyRImGv3EI71nsOSF9lMRH9", "1gDy06UAPKxENPyqobqY164uIcKu9P8Xv",
                                         False, "75.0"),
}
WITHOUT_BN = {"resnet50v1_sn.in1k_8x1_step100", "resnet50v1_sn.in1k_8x1_detectron"}
DESIGN_ARCHS = [f"resnet{d}v{v}_{n}" for d in (18, 34, 50, 101, 152) for v in (1, 2) for n in ("sn", "bn", "gn")]
DESIGN_ARCHS.append("resnet50v1_ssn")


@pytest.fixture(autouse=True)
def clean_state(monkeypatch):
    """No overlay from the environment or an earlier test; the registry is the real one, untouched."""
    monkeypatch.delenv(zoo.MANIFEST_ENV, raising=False)
    zoo.set_overlay(None)
    yield
    zoo.set_overlay(None)


def shipped_data() -> dict:
    return json.loads((resources.files("snzoo") / SHIPPED).read_text(encoding="utf-8"))


def write(path: Path, data) -> Path:
    path.write_text(data if isinstance(data, str) else json.dumps(data, indent=2), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------ shipped manifest


def test_shipped_manifest_has_the_twelve_published_entries():
    m = zoo.load_manifest()
    imagenet = [name for name, e in m.entries.items() if e.eval.dataset == "imagenet-1k-val"]
    # File order is the reference table's order, then the detection release's backbones.
    assert imagenet == list(PUBLISHED) + list(DETECTRON_RELEASE)
    norms = [m.entries[n].norm.type for n in imagenet]
    assert norms.count("sn") == 9 and norms.count("ssn") == 5
    assert m.path.name == SHIPPED and m.overlay is None


def test_shipped_manifest_passes_the_schema_file_itself():
    schema = json.loads((resources.files("snzoo.zoo") / "manifest.schema.json").read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    assert list(jsonschema.Draft202012Validator(schema).iter_errors(shipped_data())) == []


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_metrics_sources_and_checksums(name):
    top1, top5, drive_id, md5 = PUBLISHED[name]
    entry = zoo.load_manifest().entries[name]
    assert entry.metrics["imagenet-1k-val"] == zoo.Metrics(top1=top1, top5=top5)
    assert len(entry.sources) == 1
    source = entry.sources[0]
    assert source.url == GD + drive_id and source.kind == "gdrive" and source.format == "original"
    assert source.sha256 is None  # never invented
    assert source.md5 == md5
    assert entry.num_classes == 1000
    assert (entry.eval.resize, entry.eval.crop, entry.eval.interpolation) == (256, 224, "bilinear")
    assert entry.eval.crop_pct == pytest.approx(0.875)
    assert entry.eval.mean == (0.485, 0.456, 0.406) and entry.eval.std == (0.229, 0.224, 0.225)


@pytest.mark.parametrize("name", list(DETECTRON_RELEASE))
def test_detection_release_backbones_are_unpinned_drive_files_without_published_accuracy(name):
    fpn_id, plain_id, using_bn, paper_top1 = DETECTRON_RELEASE[name]
    entry = zoo.load_manifest().entries[name]
    assert [s.url for s in entry.sources] == [GD + fpn_id, GD + plain_id]
    assert all(s.kind == "gdrive" and s.format == "detectron" for s in entry.sources)
    assert all(s.sha256 is None and s.md5 is None and s.size is None for s in entry.sources)  # never invented
    assert entry.metrics == {"imagenet-1k-val": zoo.Metrics(top1=None, top5=None)}
    assert any(paper_top1 in note and "paper's table" in note for note in entry.notes)
    assert any("detection release" in note for note in entry.notes)
    assert entry.norm.using_bn is using_bn and not entry.default and entry.num_classes == 1000
    assert entry.provenance["repository"] == "https://github.com/switchablenorms/SwitchNorm_Detection"
    assert (entry.eval.resize, entry.eval.crop, entry.eval.interpolation) == (256, 224, "bilinear")


def test_upstream_file_names_where_known():
    m = zoo.load_manifest()
    assert m.entries["resnet50v1_sn.in1k_8x32_cos120"].sources[0].file_name == "ResNet50v1+SN(8,32)-77.49.pth"
    assert m.entries["resnet50v1_sn.in1k_8x32_step100"].sources[0].file_name == "ResNet50v1+SN(8,32)-76.92.pth"
    assert m.entries["resnet50v2_sn.in1k_8x32_cos120"].sources[0].file_name == "ResNet50v2+SN(8,32)-77.57.pth"
    assert m.entries["resnet50v1_ssn.in1k_8x2_step100"].sources[0].file_name == "ssn_8x2_75.848.pth"
    # Where upstream recorded no name, the entry says so.
    unknown = m.entries["resnet50v1_ssn.in1k_8x16_step100"]
    assert "published_file_name" not in unknown.provenance
    assert any("file name" in note for note in unknown.notes)


def imagenet_entries(m) -> dict:
    """The published ImageNet entries (the shipped manifest also holds entries snzoo trained itself)."""
    return {n: e for n, e in m.entries.items() if e.eval.dataset == "imagenet-1k-val"}


def test_norm_settings_follow_the_code_that_trained_each_checkpoint():
    m = zoo.load_manifest()
    for name, entry in imagenet_entries(m).items():
        assert entry.norm.last_gamma is ("v1_" in name), name
        assert entry.norm.using_bn is (name not in WITHOUT_BN), name
        if name.endswith("cos120"):
            assert (entry.norm.momentum, entry.norm.using_moving_average) == (0.9, True), name
        elif entry.norm.type == "sn":
            assert (entry.norm.momentum, entry.norm.using_moving_average) == (0.997, False), name
        else:
            assert (entry.norm.momentum, entry.norm.using_moving_average) == (0.997, True), name
    assert m.entries["resnet50v1_sn.in1k_8x1_step100"].model_kwargs() == {
        "num_classes": 1000, "using_bn": False, "using_moving_average": False, "momentum": 0.997,
        "last_gamma": True}


def test_learning_rates_scale_with_the_batch():
    m = zoo.load_manifest()
    assert m.entries["resnet50v1_sn.in1k_8x32_step100"].learning_rate() == pytest.approx(0.1)
    assert m.entries["resnet50v1_sn.in1k_8x4_step100"].learning_rate() == pytest.approx(0.0125)
    assert m.entries["resnet50v1_sn.in1k_8x1_step100"].learning_rate() == pytest.approx(0.003125)
    assert m.entries["resnet50v1_ssn.in1k_8x2_step100"].learning_rate() == pytest.approx(0.00625)


def test_recipes_have_the_same_keys_and_the_published_settings():
    m = zoo.load_manifest()
    keysets = {tuple(e.recipe) for e in imagenet_entries(m).values()}
    assert len(keysets) == 1
    for name, entry in imagenet_entries(m).items():
        r = entry.recipe
        batch = int(name.split("_8x")[1].split("_")[0])
        assert r["batch"] == {"devices": 8, "per_device": batch}
        assert r["optimizer"]["weight_decay"] == 1e-4 and r["optimizer"]["weight_decay_norm"] is True
        assert r["dropout"] == 0.5 and r["label_smoothing"] == 0.0 and r["statistics"] == "per_device"
        if name.endswith("cos120"):
            assert r["epochs"] == 120 and r["schedule"] == {"type": "cosine", "warmup_epochs": 5}
            assert r["augmentation"]["final_phase"] is None and r["batch_average"] is None
        else:
            assert r["epochs"] == 100
            assert r["schedule"] == {"type": "step", "milestones": [30, 60, 90], "gamma": 0.1, "warmup_epochs": 0}
        if entry.norm.type == "ssn":
            assert r["augmentation"]["color_jitter"] == 0.4
            assert r["augmentation"]["final_phase"] == {"epochs": 5, "resize": 256, "crop": "random"}
            assert r["sparsestmax"] == {"radius_schedule": "linear_0_to_1", "importance_lr_scale": 0.1,
                                        "importance_weight_decay": 0.0, "grad_clip_norm": 1.0}
            assert r["average_running_stats_before_eval"] is True
        else:
            assert r["sparsestmax"] is None and r["augmentation"]["color_jitter"] is None
    step = m.entries["resnet50v1_sn.in1k_8x32_step100"].recipe
    assert step["augmentation"]["final_phase"] == {"epochs": 5, "resize": 256, "crop": "center"}
    assert step["batch_average"] == {"iterations": 200, "every_epoch": True}


def test_uncertain_published_numbers_carry_a_note():
    entry = zoo.load_manifest().entries["resnet50v1_ssn.in1k_8x4_step100"]
    assert entry.metrics["imagenet-1k-val"].top5 == 96.71
    assert any("96.71" in note and "typo" in note for note in entry.notes)


def test_one_default_per_architecture():
    m = zoo.load_manifest()
    defaults = {e.architecture: e.name for e in imagenet_entries(m).values() if e.default}
    assert defaults == {
        "resnet101v2_sn": "resnet101v2_sn.in1k_8x32_cos120",
        "resnet101v1_sn": "resnet101v1_sn.in1k_8x32_cos120",
        "resnet50v2_sn": "resnet50v2_sn.in1k_8x32_cos120",
        "resnet50v1_sn": "resnet50v1_sn.in1k_8x32_cos120",
        "resnet50v1_ssn": "resnet50v1_ssn.in1k_8x32_step100",
    }


def test_to_dict_is_the_manifest_entry_plus_its_name():
    raw = shipped_data()["entries"]
    for name, entry in zoo.load_manifest().entries.items():
        d = json.loads(json.dumps(entry.to_dict()))
        assert d.pop("name") == name
        assert d == raw[name]
        assert zoo.Entry.from_dict(name, d) == entry
        assert (entry.architecture, entry.tag) == tuple(name.split("."))


# The layer class each norm name builds; exact types, since SparseSwitchNorm2d and SwitchNorm2d share a base.
NORM_LAYER = {"sn": SwitchNorm2d, "ssn": SparseSwitchNorm2d, "bn": GhostBatchNorm2d, "gn": nn.GroupNorm}


def norm_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, tuple(NORM_LAYER.values()))]


@pytest.mark.parametrize("name", DESIGN_ARCHS)
def test_every_designed_architecture_is_registered_and_builds(name):
    spec = registry.ARCHITECTURES[name]
    depth, version, norm = int(name[6:name.index("v")]), int(name[name.index("v") + 1]), name.rsplit("_", 1)[1]
    assert (spec.name, spec.depth, spec.version, spec.norm) == (name, depth, version, norm)
    model = spec.build(num_classes=7)
    layers = norm_layers(model)
    assert layers and all(type(layer) is NORM_LAYER[norm] for layer in layers)
    assert model.get_classifier().out_features == 7


@pytest.mark.parametrize("name", list(zoo.load_manifest().entries))
def test_every_manifest_entry_builds_from_the_real_registry(name):
    entry = zoo.load_manifest().entries[name]
    spec = registry.ARCHITECTURES[entry.architecture]
    assert spec.norm == entry.norm.type
    model = spec.build(**entry.model_kwargs()).eval()
    layers = norm_layers(model)
    assert layers and all(type(layer) is NORM_LAYER[entry.norm.type] for layer in layers)
    if entry.norm.type in ("sn", "ssn"):
        assert all(layer.using_bn == entry.norm.using_bn for layer in layers)
    # A small image is enough for a shape check: the ResNets end in an adaptive pool.
    size = min(entry.eval.crop, 32)
    with torch.no_grad():
        logits = model(torch.zeros(1, len(entry.eval.mean), size, size))
    assert logits.shape == (1, entry.num_classes)
    assert torch.isfinite(logits).all()


# ------------------------------------------------------------------------------------------ lookups


def test_get_entry_bare_architecture_gives_the_default():
    assert zoo.get_entry("resnet50v1_sn").name == "resnet50v1_sn.in1k_8x32_cos120"
    assert zoo.get_entry("resnet50v1_ssn").name == "resnet50v1_ssn.in1k_8x32_step100"
    assert zoo.get_entry("resnet50v1_sn.in1k_8x4_step100").recipe["batch"]["per_device"] == 4


@pytest.mark.parametrize("name, suggestion", [
    ("resnet50v1_sn.in1k_8x32_cos", "resnet50v1_sn.in1k_8x32_cos120"),
    ("resnet50v1_sn.in1k_8x4_step", "resnet50v1_sn.in1k_8x4_step100"),
    ("resnet50v1sn", "resnet50v1_sn"),
    ("resnet50v1_snn", "resnet50v1_ssn"),
])
def test_unknown_names_suggest_the_closest(name, suggestion):
    with pytest.raises(UnknownModelError) as info:
        zoo.get_entry(name)
    message = str(info.value)
    assert repr(name) in message and suggestion in message and "\n" not in message
    assert isinstance(info.value, KeyError)


def test_architecture_without_weights_says_so():
    with pytest.raises(UnknownModelError, match="'resnet18v1_sn' has no pretrained weights"):
        zoo.get_entry("resnet18v1_sn")


def test_list_models_architectures():
    names = zoo.list_models()
    assert names == sorted(names)
    assert {"resnet18v1_sn", "resnet50v1_ssn", "resnet152v2_gn"} <= set(names)
    assert not any("." in n for n in names)
    v1_50 = zoo.list_models("resnet50v1_*")
    assert {"resnet50v1_sn", "resnet50v1_ssn", "resnet50v1_bn", "resnet50v1_gn"} <= set(v1_50)
    assert all(n.startswith("resnet50v1_") for n in v1_50)
    assert zoo.list_models("*_ssn") == ["resnet50v1_ssn"]
    assert zoo.list_models("nothing*") == []


def test_list_models_pretrained():
    assert zoo.list_models(pretrained=True) == sorted(zoo.load_manifest().entries)
    assert set(PUBLISHED) <= set(zoo.list_models("*.in1k_*", pretrained=True))
    # The pattern matches the architecture as well as the full entry name.
    assert zoo.list_models("resnet50v1_sn", pretrained=True) == sorted(
        n for n in [*PUBLISHED, *DETECTRON_RELEASE] if n.startswith("resnet50v1_sn."))
    assert zoo.list_models("*.in1k_8x4*", pretrained=True) == [
        "resnet50v1_sn.in1k_8x4_step100", "resnet50v1_ssn.in1k_8x4_step100"]
    assert zoo.list_models("*cos120", pretrained=True) == sorted(n for n in PUBLISHED if n.endswith("cos120"))
    assert zoo.list_models("resnet18*", pretrained=True) == []


def test_zoo_table_markdown():
    table = zoo.zoo_table_markdown()
    lines = table.strip().split("\n")
    assert len(lines) == 2 + SHIPPED_COUNT
    rows = [line.split(" | ") for line in lines[2:]]
    assert [r[0].lstrip("| `").split("`")[0] for r in rows][:12] == list(PUBLISHED)
    first = lines[2]
    assert "(default)" in first and "8x32" in first and "78.81" in first and "94.16" in first
    assert "120, warmup 5 + cosine" in first and first.endswith("| none |")
    ssn_8x8 = next(line for line in lines if "resnet50v1_ssn.in1k_8x8_step100" in line)
    assert "(default)" not in ssn_8x8 and "100, step 30/60/90" in ssn_8x8 and ssn_8x8.endswith("| md5 |")
    assert zoo.zoo_table_markdown(zoo.load_manifest()) == table


# ------------------------------------------------------------------------------------------ validation errors

COS = "resnet50v1_sn.in1k_8x32_cos120"


def mutated(mutate) -> dict:
    data = shipped_data()
    mutate(data["entries"])
    return data


def load_error(tmp_path, data) -> str:
    path = write(tmp_path / "bad.json", data)
    with pytest.raises(ManifestError) as info:
        zoo.load_manifest(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    return message


def test_bad_sha256_message_is_exact(tmp_path):
    message = load_error(tmp_path, mutated(lambda e: e[COS]["sources"][0].update(sha256="abc")))
    assert message == (f"{tmp_path / 'bad.json'}: entry '{COS}', field 'sources[0].sha256': 'abc' is not valid "
                       f"(expected null or 64 lowercase hex digits)")


def test_error_in_an_overlaid_field_blames_the_overlay(tmp_path):
    overlay = write(tmp_path / "ov.json", {"schema_version": 1, "entries": {COS: {"default": False}}})
    with pytest.raises(ManifestError) as info:
        zoo.load_manifest(overlay=overlay)
    assert str(info.value).startswith(f"{overlay}: entry '{COS}', field 'default': ")


@pytest.mark.parametrize("mutate, entry, field, words", [
    (lambda e: e[COS]["recipe"].pop("epochs"), COS, "recipe.epochs", "is missing"),
    (lambda e: e[COS].pop("norm"), COS, "norm", "is missing"),
    (lambda e: e[COS]["sources"][0].pop("md5"), COS, "sources[0].md5", "is missing"),
    (lambda e: e[COS].update(num_classes="1000"), COS, "num_classes", "expected an integer"),
    (lambda e: e[COS]["norm"].update(using_bn=1), COS, "norm.using_bn", "expected true or false"),
    (lambda e: e[COS]["sources"][0].update(sha256="A" * 64), COS, "sources[0].sha256", "64 lowercase hex"),
    (lambda e: e[COS]["sources"][0].update(md5="xyz"), COS, "sources[0].md5", "32 hex"),
    (lambda e: e[COS]["sources"][0].update(size=0), COS, "sources[0].size", "positive"),
    (lambda e: e[COS]["sources"][0].update(kind="ftp"), COS, "sources[0].kind", "https, file, gdrive, hf-hub, or package"),
    (lambda e: e[COS]["eval"].update(interpolation="lanczos"), COS, "eval.interpolation", "'bicubic'"),
    (lambda e: e[COS]["sources"][0].update(file_name="../x.pth"), COS, "sources[0].file_name", "plain file name"),
    (lambda e: e[COS]["sources"][0].update(file_name="/tmp/x.pth"), COS, "sources[0].file_name", "plain"),
    (lambda e: e[COS]["sources"][0].update(file_name="a\\x.pth"), COS, "sources[0].file_name", "plain"),
    (lambda e: e[COS].update(metric={}), COS, "metric", "is not a known field"),
    (lambda e: e[COS]["recipe"]["optimizer"].update(wd=0), COS, "recipe.optimizer.wd", "not a known field"),
    (lambda e: e["resnet50v1_sn.in1k_8x4_step100"].update(default=True),
     "resnet50v1_sn.in1k_8x4_step100", "default", f"{COS!r} is already the default"),
    (lambda e: e[COS].update(default=False), COS, "default", "has no default entry"),
    (lambda e: e[COS].update(architecture="resnet50v2_sn"), COS, "architecture", "expected 'resnet50v1_sn'"),
    (lambda e: e["resnet50v1_ssn.in1k_8x2_step100"]["norm"].update(type="sn"),
     "resnet50v1_ssn.in1k_8x2_step100", "norm.type", "expected 'ssn'"),
    (lambda e: e[COS]["recipe"]["schedule"].update(milestones=[30]), COS, "recipe.schedule.milestones",
     "not a known field"),
    (lambda e: e[COS]["eval"].update(crop=300), COS, "eval.crop", "at most resize"),
])
def test_schema_and_semantic_errors_name_entry_and_field(tmp_path, mutate, entry, field, words):
    message = load_error(tmp_path, mutated(mutate))
    assert f"entry {entry!r}, field {field!r}" in message
    assert words in message


def test_unknown_architecture_suggests_the_closest(tmp_path):
    def rename(entries):
        raw = entries.pop("resnet101v1_sn.in1k_8x32_cos120")
        raw["architecture"] = "resnet101v3_sn"
        entries["resnet101v3_sn.in1k_8x32_cos120"] = raw
    message = load_error(tmp_path, mutated(rename))
    assert "entry 'resnet101v3_sn.in1k_8x32_cos120', field 'architecture'" in message
    assert "unknown architecture 'resnet101v3_sn'" in message and "resnet101v1_sn" in message


def test_bad_entry_name(tmp_path):
    message = load_error(tmp_path, mutated(lambda e: e.update({"ResNet50": e.pop(COS)})))
    assert "entry name 'ResNet50' is not valid" in message and "ARCH.TAG" in message


def test_missing_top_level_field(tmp_path):
    assert load_error(tmp_path, {"entries": {}}).endswith("field 'schema_version' is missing")
    assert "expected 1" in load_error(tmp_path, {"schema_version": 2, "entries": {}})


def test_invalid_json_names_line_and_column(tmp_path):
    text = json.dumps(shipped_data(), indent=2).replace('"num_classes": 1000,', '"num_classes": 1000,,', 1)
    message = load_error(tmp_path, text)
    line = next(i for i, t in enumerate(text.splitlines(), 1) if ",," in t)
    assert f"invalid JSON at line {line}, column " in message


def test_duplicate_keys_are_rejected(tmp_path):
    text = json.dumps(shipped_data(), indent=2)
    text = text.replace('"num_classes": 1000,', '"num_classes": 1000, "num_classes": 10,', 1)
    assert "'num_classes' appears twice" in load_error(tmp_path, text)


def test_missing_manifest_file(tmp_path):
    with pytest.raises(ManifestError, match="no such manifest file"):
        zoo.load_manifest(tmp_path / "absent.json")


# ------------------------------------------------------------------------------------------ overlays

NEW = "resnet18v1_sn.custom_1x64_cos10"
LOCAL_SHA = "0123456789abcdef" * 4


def overlay_data() -> dict:
    new = copy.deepcopy(shipped_data()["entries"][COS])
    new.update(architecture="resnet18v1_sn", num_classes=10, default=True, notes=["trained locally"])
    new["sources"] = [{"url": "/data/r18.safetensors", "kind": "file", "format": "safetensors",
                       "file_name": "r18.safetensors", "sha256": LOCAL_SHA, "md5": None, "size": 1234}]
    return {"schema_version": 1, "entries": {
        COS: {"sources": [{"url": "https://mirror.example.org/r50.pth", "kind": "https", "format": "original",
                           "file_name": "r50.pth", "sha256": LOCAL_SHA, "md5": None, "size": None}]},
        NEW: new,
    }}


def check_overlaid(m: zoo.Manifest, shipped: zoo.Manifest):
    assert len(m) == SHIPPED_COUNT + 1 and list(m.entries)[-1] == NEW
    replaced, original = m.entries[COS], shipped.entries[COS]
    assert replaced.sources == (zoo.Source("https://mirror.example.org/r50.pth", "https", "original", "r50.pth",
                                           LOCAL_SHA, None, None),)
    # Only sources were replaced.
    assert (replaced.metrics, replaced.recipe, replaced.norm, replaced.notes, replaced.default) == (
        original.metrics, original.recipe, original.norm, original.notes, original.default)
    assert zoo.get_entry("resnet18v1_sn").name == NEW
    assert zoo.get_entry(NEW).num_classes == 10
    assert NEW in zoo.list_models("resnet18*", pretrained=True)


def test_overlay_via_set_overlay(tmp_path):
    shipped = zoo.manifest()
    path = write(tmp_path / "overlay.json", overlay_data())
    zoo.set_overlay(path)
    m = zoo.manifest()
    assert m.overlay == path
    check_overlaid(m, shipped)
    zoo.set_overlay(None)
    assert len(zoo.manifest()) == SHIPPED_COUNT and zoo.manifest().overlay is None
    with pytest.raises(UnknownModelError):
        zoo.get_entry(NEW)


def test_overlay_via_environment(tmp_path, monkeypatch):
    shipped = zoo.manifest()
    path = write(tmp_path / "overlay.json", overlay_data())
    monkeypatch.setenv(zoo.MANIFEST_ENV, str(path))
    check_overlaid(zoo.manifest(), shipped)
    # Editing the overlay file is picked up.
    data = overlay_data()
    del data["entries"][NEW]
    write(path, data)
    assert len(zoo.manifest()) == len(shipped) and zoo.manifest().entries[COS].sources[0].file_name == "r50.pth"
    monkeypatch.delenv(zoo.MANIFEST_ENV)
    assert zoo.manifest().entries[COS].sources == shipped.entries[COS].sources


def test_set_overlay_wins_over_environment(tmp_path, monkeypatch):
    env_data = overlay_data()
    del env_data["entries"][NEW]
    monkeypatch.setenv(zoo.MANIFEST_ENV, str(write(tmp_path / "env.json", env_data)))
    assert len(zoo.manifest()) == SHIPPED_COUNT
    zoo.set_overlay(write(tmp_path / "explicit.json", overlay_data()))
    assert len(zoo.manifest()) == SHIPPED_COUNT + 1
    zoo.set_overlay(None)
    assert len(zoo.manifest()) == SHIPPED_COUNT and zoo.manifest().overlay == tmp_path / "env.json"


def test_bad_overlay_is_rejected_and_blamed(tmp_path):
    data = overlay_data()
    data["entries"][COS]["sources"][0]["sha256"] = "xyz"
    path = write(tmp_path / "overlay.json", data)
    with pytest.raises(ManifestError) as info:
        zoo.set_overlay(path)
    assert str(info.value).startswith(f"{path}: entry '{COS}', field 'sources[0].sha256': 'xyz'")
    assert len(zoo.manifest()) == SHIPPED_COUNT  # the failed overlay left the current manifest alone


@pytest.mark.parametrize("entries, words", [
    ({COS: {"sourcez": []}}, f"entry '{COS}', field 'sourcez' is not a known field"),
    ({NEW: {"architecture": "resnet18v1_sn"}}, f"entry '{NEW}', field 'default' is missing"),
    ({COS: []}, f"entry '{COS}': [] is not valid (expected an object)"),
])
def test_overlay_shape_errors(tmp_path, entries, words):
    path = write(tmp_path / "overlay.json", {"schema_version": 1, "entries": entries})
    with pytest.raises(ManifestError) as info:
        zoo.load_manifest(overlay=path)
    assert str(info.value).startswith(f"{path}: {words}")


def test_architecture_and_model_listings_match_patterns_the_same_way():
    import snzoo
    from snzoo.models import list_architectures

    for pattern in ("resnet50*", "RESNET50*", "*_SSN", "resnet?0v1_sn", "[r]esnet18*"):
        assert snzoo.list_models(pattern) == list_architectures(pattern) == snzoo.list_architectures(pattern)
    assert snzoo.list_models("RESNET50V1_SN") == ["resnet50v1_sn"]
    assert "resnet50v1_sn.in1k_8x32_cos120" in snzoo.list_models("RESNET50V1_SN*", pretrained=True)
