"""torch.hub: local load, list and help, and pretrained weights from the cache."""

from pathlib import Path

import pytest
import torch

import snzoo
from snzoo.weights import read_state_dict
from snzoo.errors import WeightsNotAvailableError
from snzoo.weights import UnpinnedWeightsWarning

REPO = Path(__file__).resolve().parents[1]
GITHUB = "snzoo-owner/snzoo:main"


@pytest.fixture
def hub_checkout(tmp_path, monkeypatch):
    """torch.hub's GitHub cache with this checkout in it, so list/help run offline as after a first download."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    hub_dir = Path(torch.hub.get_dir())
    hub_dir.mkdir(parents=True)
    (hub_dir / "snzoo-owner_snzoo_main").symlink_to(REPO, target_is_directory=True)
    return dict(trust_repo=True, skip_validation=True)


def test_hub_list_has_one_entry_point_per_architecture_and_task_model(hub_checkout):
    from snzoo.detection import DETECTION_MODELS
    from snzoo.segmentation import SEGMENTATION_MODELS

    assert sorted(torch.hub.list(GITHUB, **hub_checkout)) == sorted(
        snzoo.list_models() + list(DETECTION_MODELS) + list(SEGMENTATION_MODELS))


def test_hub_loads_task_models_with_their_documentation(hub_checkout):
    detector = torch.hub.load(GITHUB, "maskrcnn_resnet_fpn_sn", num_classes=3, backbone="resnet18v1_sn",
                              pretrained_backbone=False, **hub_checkout)
    assert type(detector).__name__ == "MaskRCNN" and detector.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 3
    segmenter = torch.hub.load(GITHUB, "deeplabv3_resnet_sn", num_classes=4, backbone="resnet18v1_sn",
                               pretrained_backbone=False, **hub_checkout)
    with torch.no_grad():
        assert segmenter.eval()(torch.zeros(1, 3, 64, 64))["out"].shape == (1, 4, 64, 64)
    assert "41.01 box AP / 36.12 mask AP" in torch.hub.help(GITHUB, "maskrcnn_resnet50_fpn_sn", **hub_checkout)


def test_hub_help_lists_entries_and_accuracies(hub_checkout):
    text = torch.hub.help(GITHUB, "resnet50v1_sn", **hub_checkout)
    assert "in1k_8x32_cos120 (default): 77.49 / 93.32" in text
    assert "in1k_8x1_step100: 75.94 / 92.7" in text
    assert "No pretrained weights" in torch.hub.help(GITHUB, "resnet34v2_bn", **hub_checkout)


def test_hub_load_from_the_github_cache(hub_checkout):
    model = torch.hub.load(GITHUB, "resnet50v2_sn", num_classes=5, **hub_checkout)
    assert len(model.state_dict()) == 355 and model.fc.out_features == 5


def test_hub_load_builds_the_architecture_with_kwargs():
    model = torch.hub.load(str(REPO), "resnet18v1_sn", source="local", num_classes=3)
    assert model.fc.out_features == 3 and len(model.state_dict()) == 20 + 20 * 6 + 2  # 20 convs, 20 SN layers, fc


def test_hub_pretrained_converts_a_file_placed_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SNZOO_CACHE", str(tmp_path))
    name = "resnet50v1_sn.in1k_8x1_step100"
    source = snzoo.create_model(name)
    with torch.no_grad():
        source.fc.bias.uniform_(-1, 1)
    file_name = snzoo.get_entry(name).sources[0].file_name
    torch.save({"epoch": 100, "state_dict": {"module." + k: v for k, v in source.state_dict().items()}},
               tmp_path / file_name)
    with pytest.warns(UnpinnedWeightsWarning, match="no checksum is published"):
        model = torch.hub.load(str(REPO), "resnet50v1_sn", source="local", tag="in1k_8x1_step100", pretrained=True)
    assert not model.sn1.using_bn
    assert torch.equal(model.fc.bias, source.fc.bias)
    assert model.pretrained_cfg["name"] == name
    (canonical,) = tmp_path.glob(f"{name}-*.safetensors")
    assert read_state_dict(canonical).keys() == source.state_dict().keys()


def test_hub_pretrained_without_weights_says_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv("SNZOO_CACHE", str(tmp_path))
    with pytest.raises(WeightsNotAvailableError) as info:
        torch.hub.load(str(REPO), "resnet50v2_sn", source="local", pretrained=True)
    message = str(info.value)
    assert "resnet50v2_sn.in1k_8x32_cos120" in message and "drive.google.com" in message
    assert str(tmp_path / "ResNet50v2+SN(8,32)-77.57.pth") in message
