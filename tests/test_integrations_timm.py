"""snzoo models through timm's API (snzoo.integrations.timm) and segmentation_models_pytorch's `tu-` encoders,
on real photographs; weights come from the Fashion-MNIST entries shipped inside the package (offline)."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

import snzoo
from snzoo.errors import IntegrationArgumentError, UnknownModelError
from tests.photos import photo_batch, photo_paths

timm = pytest.importorskip("timm")
snzoo_timm = pytest.importorskip("snzoo.integrations.timm")

ENTRY = "resnet20_sn.fmnist_8x2_cos2"  # shipped in the package: the pretrained path works offline
REPO = Path(__file__).resolve().parents[1]


def _grey_photos(entry_name: str = ENTRY) -> torch.Tensor:
    """The photographs through timm's eval transform for the entry's protocol, as grey images (the entry's)."""
    config = timm.data.resolve_data_config(pretrained_cfg=timm.models.get_pretrained_cfg(entry_name).to_dict())
    transform = timm.data.create_transform(**config)
    return torch.stack([transform(Image.open(p).convert("L")) for p in photo_paths()[:4]])


def _sn_importance(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if n.endswith(("mean_weight", "var_weight"))}


# ------------------------------------------------------------------------------------------------- registry


def test_timm_lists_every_snzoo_architecture_and_entry():
    assert set(snzoo.list_models("*_sn")) <= set(timm.list_models("*_sn"))
    assert timm.list_models("*_sn", pretrained=True) != []
    assert set(timm.list_models("*_sn", pretrained=True)) == set(snzoo.list_models("*_sn", pretrained=True))
    # an architecture without an entry is a model name but has no weights
    assert timm.is_model("resnet32_sn") and not timm.models.is_model_pretrained("resnet32_sn")
    assert timm.models.is_model_pretrained("resnet20_sn") and timm.models.is_model_pretrained(ENTRY)
    assert timm.models.get_pretrained_cfg("resnet20_sn").tag == snzoo.get_entry("resnet20_sn").tag


def test_registering_again_changes_nothing_and_warns_nothing():
    entry_point = timm.models.model_entrypoint("resnet50v1_sn")
    before = timm.list_models("*_sn*", pretrained=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        names = snzoo_timm.register()
        assert snzoo_timm.register() == names
    assert timm.models.model_entrypoint("resnet50v1_sn") is entry_point
    assert timm.list_models("*_sn*", pretrained=True) == before
    assert ENTRY in names and "resnet50v1_sn" in names and "resnet50v1_sn.in1k_8x32_cos120" in names


# ------------------------------------------------------------------------------------ models and weights


def test_pretrained_entry_through_timm_is_snzoos_model():
    ours = snzoo.create_model(ENTRY, pretrained=True).eval()
    for name in (ENTRY, "resnet20_sn"):  # the bare name is the default entry, as timm's default tag
        model = timm.create_model(name, pretrained=True).eval()
        assert model.state_dict().keys() == ours.state_dict().keys()
        assert all(torch.equal(v, ours.state_dict()[k]) for k, v in model.state_dict().items())
    photos = _grey_photos()
    with torch.no_grad():
        logits = model(photos)
        assert torch.equal(logits, ours(photos))
        assert torch.equal(model.forward_head(model.forward_features(photos)), logits)
    assert logits.shape == (4, 10) and torch.isfinite(logits).all()


def test_features_only_through_timm_equals_snzoos_features():
    ours = snzoo.create_model(ENTRY, pretrained=True, features_only=True, out_indices=(1, 2, 3)).eval()
    model = timm.create_model(ENTRY, pretrained=True, features_only=True, out_indices=(1, 2, 3)).eval()
    photos = _grey_photos()
    with torch.no_grad():
        got, want = model(photos), ours(photos)
    assert len(got) == 3 and all(torch.equal(a, b) for a, b in zip(got, want))
    assert model.feature_info.channels() == [16, 32, 64] and model.feature_info.reduction() == [1, 2, 4]
    assert "num_classes" not in model.pretrained_cfg and model.pretrained_cfg["tag"] == "fmnist_8x2_cos2"


def test_resnet50_architecture_and_imagenet_entry_configs():
    model = timm.create_model("resnet50v1_sn.in1k_8x32_cos120", pretrained=False, features_only=True,
                              out_indices=(1, 2, 3, 4))
    assert model.feature_info.channels() == [256, 512, 1024, 2048]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        maps = model(photo_batch(64, count=2))
    assert [m.shape[-1] for m in maps] == [16, 8, 4, 2]
    entry = snzoo.get_entry("resnet50v1_sn.in1k_8x32_cos120")
    config = timm.data.resolve_data_config(model=model)
    assert config == {"input_size": (3, entry.eval.crop, entry.eval.crop), "interpolation": entry.eval.interpolation,
                      "mean": entry.eval.mean, "std": entry.eval.std, "crop_pct": entry.eval.crop / entry.eval.resize,
                      "crop_mode": "center"}
    assert config["crop_pct"] == pytest.approx(224 / 256)


def test_data_config_and_pretrained_cfg_are_the_entrys_protocol():
    entry = snzoo.get_entry(ENTRY)
    model = timm.create_model(ENTRY, pretrained=True)
    config = timm.data.resolve_model_data_config(model)
    assert config == timm.data.resolve_data_config(model=model)
    assert config["input_size"] == (len(entry.eval.mean), entry.eval.crop, entry.eval.crop) == (1, 28, 28)
    assert (config["interpolation"], config["mean"], config["std"]) == ("bilinear", entry.eval.mean, entry.eval.std)
    assert config["crop_pct"] == entry.eval.crop / entry.eval.resize and config["crop_mode"] == "center"
    cfg = model.pretrained_cfg
    assert model.default_cfg is cfg
    assert (cfg["architecture"], cfg["tag"], cfg["num_classes"]) == ("resnet20_sn", "fmnist_8x2_cos2", 10)
    assert (cfg["first_conv"], cfg["classifier"]) == ("conv1", "fc")
    assert cfg["url"] == "snzoo:" + ENTRY  # names the entry: timm's own downloader cannot fetch it
    timm.models.PretrainedCfg(**cfg)  # timm accepts it back as a pretrained_cfg


def test_timm_kwargs_pass_through():
    ours = snzoo.create_model(ENTRY, pretrained=True)
    five = timm.create_model(ENTRY, pretrained=True, num_classes=5, drop_rate=0.25, global_pool="avg")
    assert five.fc.out_features == 5 and five.num_classes == 5 and five.dropout.p == 0.25
    assert torch.equal(five.layer3[0].conv1.weight, ours.layer3[0].conv1.weight)
    rgb = timm.create_model(ENTRY, pretrained=True, in_chans=3)
    assert torch.equal(rgb.conv1.weight, snzoo.create_model(ENTRY, pretrained=True, in_chans=3).conv1.weight)
    with torch.no_grad():
        assert rgb.eval()(photo_batch(28, count=2)).shape == (2, 10)
    dilated = timm.create_model("resnet18v1_sn", features_only=True, output_stride=8)
    assert dilated.feature_info.reduction() == [2, 4, 8, 8, 8]
    momentum = timm.create_model("resnet20_sn", bn_momentum=0.25, bn_eps=1e-3)
    assert momentum.sn1.momentum == pytest.approx(0.75) and momentum.sn1.eps == 1e-3


@pytest.mark.parametrize("kwargs, named", [
    ({"drop_path_rate": 0.1}, "drop_path_rate=0.1"),
    ({"global_pool": "max"}, "global_pool='max'"),
    ({"act_layer": "gelu"}, "act_layer='gelu'"),
    ({"output_stride": 16}, "output_stride=16"),  # CIFAR ResNets have no dilated stages
])
def test_unsupported_timm_kwargs_give_one_clear_error(kwargs, named):
    with pytest.raises(IntegrationArgumentError, match=named):
        timm.create_model("resnet20_sn", **kwargs)


def test_unknown_tag_and_foreign_weight_sources_are_refused():
    with pytest.raises(UnknownModelError, match="fmnist_8x2_cos3"):
        timm.create_model("resnet20_sn.fmnist_8x2_cos3", pretrained=True)
    with pytest.raises(IntegrationArgumentError, match="hf_hub_id"):
        timm.create_model(ENTRY, pretrained=True, pretrained_cfg_overlay={"hf_hub_id": "someone/else"})


# ------------------------------------------------------------------------ what timm's scripts call


def test_what_timms_train_and_validate_scripts_call(tmp_path):
    reference = snzoo.create_model(ENTRY, pretrained=True)
    torch.save({"state_dict": reference.state_dict()}, tmp_path / "checkpoint.pth")
    from safetensors.torch import save_file
    save_file(reference.state_dict(), str(tmp_path / "weights.safetensors"))

    # validate.py: create_model(pretrained=False, checkpoint_path=...) ; train.py: pretrained_cfg_overlay file
    loaded = timm.create_model("resnet20_sn", checkpoint_path=str(tmp_path / "checkpoint.pth"))
    from_file = timm.create_model("resnet20_sn", pretrained=True,
                                  pretrained_cfg_overlay={"file": str(tmp_path / "weights.safetensors")})
    for model in (loaded, from_file):
        assert all(torch.equal(v, reference.state_dict()[k]) for k, v in model.state_dict().items())

    model = loaded.eval()
    config = timm.data.resolve_data_config({}, model=model)
    assert config["input_size"] == (1, 28, 28)
    assert model.get_classifier() is model.fc and model.num_features == 64
    photos = _grey_photos()
    with torch.no_grad():
        pooled = model.forward_head(model.forward_features(photos), pre_logits=True)
        model.reset_classifier(0)
        assert torch.equal(model(photos), pooled)
    model.reset_classifier(7, "avg")
    assert model.get_classifier().out_features == 7
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(7, "")
    with pytest.warns(UserWarning, match="does not checkpoint activations"):
        model.set_grad_checkpointing(True)
    model.set_grad_checkpointing(False)
    # one training step, as train.py runs it
    model.train()
    loss = torch.nn.functional.cross_entropy(model(photos), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in _sn_importance(model).values())


def test_timm_checkpoint_with_missing_weights_fails():
    with pytest.raises(snzoo.SnzooError, match="resnet32_sn"):
        timm.create_model("resnet32_sn", pretrained=True)


# ------------------------------------------------------------------------- segmentation_models_pytorch


def _train_step(model: torch.nn.Module, photos: torch.Tensor) -> torch.Tensor:
    model.train()
    out = model(photos)
    target = (photos.mean(1) > 0).long()  # a mask from the photographs themselves: bright vs dark
    torch.nn.functional.cross_entropy(out[:, :2], target).backward()
    return out


def test_smp_unet_with_an_sn_encoder_trains_on_photographs():
    smp = pytest.importorskip("segmentation_models_pytorch")
    # last_gamma=False (an snzoo argument passed through smp and timm): with the default zero-initialised last
    # norm of each block, nothing reaches the block's inner SN layers before the first update.
    model = smp.Unet("tu-resnet50v1_sn", encoder_weights=None, classes=3, last_gamma=False)
    assert model.encoder.out_channels == [3, 64, 256, 512, 1024, 2048]
    out = _train_step(model, photo_batch(128, count=2))
    assert out.shape == (2, 3, 128, 128) and torch.isfinite(out).all()
    grads = {n: p.grad for n, p in _sn_importance(model.encoder).items()}
    assert len(grads) > 50 and all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_smp_deeplabv3plus_dilates_the_sn_encoder_as_it_asks():
    smp = pytest.importorskip("segmentation_models_pytorch")
    model = smp.DeepLabV3Plus("tu-resnet18v1_sn", encoder_weights=None, classes=3, encoder_output_stride=16,
                              last_gamma=False)
    assert model.encoder.model.feature_info.reduction() == [2, 4, 8, 16, 16]
    photos = photo_batch(128, count=2)
    with torch.no_grad():
        maps = model.encoder.eval()(photos)
    assert [m.shape[-1] for m in maps] == [128, 64, 32, 16, 8, 8]
    out = _train_step(model, photos)
    assert out.shape == (2, 3, 128, 128)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in _sn_importance(model.encoder).values())
    eight = smp.DeepLabV3Plus("tu-resnet18v1_sn", encoder_weights=None, classes=3, encoder_output_stride=8)
    assert eight.encoder.model.feature_info.reduction() == [2, 4, 8, 8, 8]


def test_smp_pretrained_encoder_weights_come_through_snzoo(tmp_path):
    smp = pytest.importorskip("segmentation_models_pytorch")
    from safetensors.torch import save_file
    torch.manual_seed(0)
    reference = snzoo.create_model("resnet18v1_sn")
    save_file(reference.state_dict(), str(tmp_path / "encoder.safetensors"))
    model = smp.Unet("tu-resnet18v1_sn", encoder_weights=True, classes=2,
                     pretrained_cfg_overlay={"file": str(tmp_path / "encoder.safetensors")})
    encoder = model.encoder.model.state_dict()
    assert len(encoder) > 100
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in encoder.items())
    # a CIFAR-style trunk (reductions 1, 1, 2, 4) is not one of the layouts smp's tu- encoder accepts
    with pytest.raises(ValueError, match="downsampling pattern"):
        smp.Unet("tu-" + ENTRY, encoder_weights=True, classes=2)


# ------------------------------------------------------------------------------------ without timm


def test_snzoo_imports_without_timm_and_the_integration_says_what_is_missing():
    code = textwrap.dedent("""
        import sys
        sys.modules["timm"] = None  # as where timm is not installed
        sys.modules["segmentation_models_pytorch"] = None
        import snzoo, snzoo.integrations
        model = snzoo.create_model("resnet20_sn.fmnist_8x2_cos2", pretrained=True)
        try:
            import snzoo.integrations.timm
        except ImportError as exc:
            assert type(exc).__name__ == "IntegrationImportError", type(exc)
            print(str(exc))
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 1 and "needs timm" in lines[0] and "pip install" in lines[0]


def test_nothing_in_snzoo_imports_timm_or_the_integrations():
    run = subprocess.run([sys.executable, "-c", "import sys, snzoo, snzoo.eval, snzoo.train; "
                          "print(sorted(m for m in sys.modules if m.split('.')[0] in ('timm', "
                          "'segmentation_models_pytorch') or m.startswith('snzoo.integrations')))"],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 0 and run.stdout.strip() == "[]", run.stderr[-2000:]
    for path in (REPO / "snzoo").rglob("*.py"):
        if "integrations" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.startswith("snzoo.integrations") for n in names), path
