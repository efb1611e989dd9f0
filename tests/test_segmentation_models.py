"""snzoo.segmentation: torchvision's DeepLabV3 on dilated SN ResNets with SN heads, on real photographs.

Small (resnet18v1_sn, 64-96 px) so that it runs in seconds; the R-50 / R-101 builders are checked on the meta
device (structure only)."""

from __future__ import annotations

import copy
import hashlib
import json

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models.segmentation import DeepLabV3

import snzoo
from snzoo import zoo
from snzoo.errors import ModelConfigError, UnknownModelError
from snzoo.nn import FrozenSwitchNorm2d, SwitchNorm2d, switchnorm_layers
from snzoo.segmentation import (
    SEGMENTATION_MODELS,
    DeepLabBackbone,
    deeplabv3_resnet101_sn,
    deeplabv3_resnet50_sn,
    deeplabv3_resnet_sn,
)
from photos import photo_batch
from reference_sn import switch_norm
from sn_testing import TOL64, randomise, spread_input, to_numpy

pytestmark = pytest.mark.usefixtures("one_thread")

ARCH = "resnet18v1_sn"
ENTRY = "resnet18v1_sn.seg_test"
IGNORE = 255
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def small(**kwargs) -> DeepLabV3:
    return deeplabv3_resnet_sn(**{"num_classes": 3, "backbone": ARCH, "pretrained_backbone": False, **kwargs})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A classification checkpoint of resnet18v1_sn (10 classes) with seeded random weights, running statistics
    and importance weights, its state dict and its sha256."""
    torch.manual_seed(0)
    model = snzoo.create_model(ARCH, num_classes=10)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith(("mean_weight", "var_weight", "running_mean", "sn1.weight", "sn2.weight")):
                tensor.normal_()
            elif name.endswith("running_var"):
                tensor.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("weights") / "r18-seg-test.pth"
    state_dict = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save({"epoch": 1, "state_dict": {"module." + k: v for k, v in state_dict.items()}}, path)
    return path, state_dict, hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def photos():
    return photo_batch(64, count=4)


def grey_masks(images: torch.Tensor) -> torch.Tensor:
    """Masks of 3 classes from each photograph's own grey-level tertiles; a 4-pixel border is ignored (255)."""
    grey = (images * STD + MEAN).mean(dim=1)
    flat = grey.flatten(1)
    edges = torch.quantile(flat, torch.tensor([1 / 3, 2 / 3]), dim=1).T  # (N, 2)
    masks = (grey > edges[:, 0, None, None]).long() + (grey > edges[:, 1, None, None]).long()
    masks[:, :4], masks[:, -4:], masks[:, :, :4], masks[:, :, -4:] = IGNORE, IGNORE, IGNORE, IGNORE
    return masks


def backbone_state(model: DeepLabV3) -> dict[str, torch.Tensor]:
    return {k[len("backbone."):]: v for k, v in model.state_dict().items() if k.startswith("backbone.")}


# ------------------------------------------------------------------------------------------------ outputs


@pytest.mark.parametrize("output_stride", [8, 16])
def test_outputs_at_the_input_size_and_maps_at_the_output_stride(output_stride):
    x = photo_batch(96, count=2)[:, :, 16:80]  # 64 x 96: height and width differ
    model = small(num_classes=5, output_stride=output_stride, aux_loss=True).eval()
    with torch.no_grad():
        out = model(x)
        maps = model.backbone(x)
    assert set(out) == {"out", "aux"}
    assert out["out"].shape == out["aux"].shape == (2, 5, 64, 96)
    # layer3 (aux) and layer4 (out) both stop at the output stride: 8 dilates both, 16 only layer4.
    assert maps["out"].shape == (2, 512, 64 // output_stride, 96 // output_stride)
    assert maps["aux"].shape == (2, 256, 64 // output_stride, 96 // output_stride)
    assert model.backbone.feature_info.reduction() == [output_stride, output_stride]
    assert [m[0].dilation for m in model.classifier[0].convs[1:4]] == [
        (r, r) for r in {8: (12, 24, 36), 16: (6, 12, 18)}[output_stride]]
    assert torch.isfinite(out["out"]).all()
    without_aux = small(output_stride=output_stride).eval()
    assert without_aux.aux_classifier is None
    with torch.no_grad():
        assert set(without_aux(x)) == {"out"}


@pytest.mark.parametrize("output_stride", [8, 16])
def test_backbone_features_equal_the_classification_trunks(checkpoint, photos, output_stride):
    path, state_dict, _ = checkpoint
    model = small(backbone_checkpoint=path, output_stride=output_stride).eval()
    assert isinstance(model.backbone, DeepLabBackbone)
    trunk = snzoo.create_model(ARCH, checkpoint_path=path, num_classes=10, features_only=True, out_indices=(3, 4),
                               output_stride=output_stride).eval()
    with torch.no_grad():
        aux, out = trunk(photos)
        maps = model.backbone(photos)
    assert torch.equal(maps["out"], out) and torch.equal(maps["aux"], aux)
    # The classifier's keys under `backbone.`, without fc, with the file's tensors.
    backbone = backbone_state(model)
    assert sorted(backbone) == sorted(k for k in state_dict if not k.startswith("fc."))
    assert all(torch.equal(backbone[k], state_dict[k]) for k in backbone)


# ------------------------------------------------------------------------------------------------ SN heads


def test_every_norm_of_the_heads_is_a_switchnorm():
    model = small(aux_loss=True)
    for head, count in ((model.classifier, 7), (model.aux_classifier, 1)):
        norms = [m for m in head.modules() if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm,
                                                              nn.LayerNorm, SwitchNorm2d))]
        assert len(norms) == count and all(type(m) is SwitchNorm2d for m in norms)
        assert all(m.momentum == 0.997 and m.using_bn and m.using_moving_average for m in norms)
    pooling = model.classifier[0].convs[4]
    assert isinstance(pooling[0], nn.AdaptiveAvgPool2d) and type(pooling[2]) is SwitchNorm2d


@pytest.mark.parametrize("n", [1, 2])
def test_the_pooling_branch_sn_on_1x1_maps_matches_the_reference(n):
    layer = randomise(copy.deepcopy(small().classifier[0].convs[4][2]).double(), seed=n, buffers=True).train()
    x = spread_input((n, 256, 1, 1), seed=n).requires_grad_(True)
    running_mean, running_var = to_numpy(layer.running_mean), to_numpy(layer.running_var)
    y = layer(x)
    expected, expected_mean, expected_var = switch_norm(
        to_numpy(x), to_numpy(layer.weight), to_numpy(layer.bias), to_numpy(layer.mean_weight),
        to_numpy(layer.var_weight), running_mean, running_var, training=True, momentum=0.997)
    np.testing.assert_allclose(to_numpy(y), expected, **TOL64)
    np.testing.assert_allclose(to_numpy(layer.running_mean), expected_mean, **TOL64)
    np.testing.assert_allclose(to_numpy(layer.running_var), expected_var, **TOL64)
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())


@pytest.mark.parametrize("n", [1, 2])
def test_the_whole_model_runs_at_batch_one_and_two_in_train_and_eval(photos, n):
    model = small(aux_loss=True, output_stride=16)
    for training in (True, False):
        model.train(training)
        out = model(photos[:n])
        assert all(torch.isfinite(v).all() for v in out.values())
        if training:
            (out["out"].sum() + out["aux"].sum()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) == len(list(model.parameters())) and all(torch.isfinite(g).all() for g in grads)


# ------------------------------------------------------------------------------------------------ training


@pytest.fixture(scope="module")
def trained(checkpoint, photos):
    """Eight SGD steps of a 3-class model (layer2..layer4 train) on the photographs and their grey-level masks."""
    path, _, _ = checkpoint
    torch.manual_seed(0)
    model = small(backbone_checkpoint=path, trainable_layers=3, aux_loss=True).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    masks = grey_masks(photos)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.02, momentum=0.9,
                                weight_decay=1e-4)
    losses = []
    for _ in range(8):
        out = model(photos)
        loss = nn.functional.cross_entropy(out["out"], masks, ignore_index=IGNORE)
        loss = loss + 0.5 * nn.functional.cross_entropy(out["aux"], masks, ignore_index=IGNORE)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return model, before, losses


def test_the_masks_hold_three_classes_and_an_ignored_border(photos):
    masks = grey_masks(photos)
    assert set(masks.unique().tolist()) == {0, 1, 2, IGNORE}
    assert (masks[:, 4:-4, 4:-4] != IGNORE).all()


def test_a_few_sgd_steps_make_the_loss_fall(trained):
    _, _, losses = trained
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.7 * losses[0], losses


def test_frozen_stages_do_not_change_in_a_train_step(trained):
    model, before, _ = trained
    after = model.state_dict()
    frozen = ("backbone.conv1.", "backbone.sn1.", "backbone.layer1.")
    assert all(torch.equal(after[k], before[k]) for k in before if k.startswith(frozen))
    for k in ("backbone.layer2.0.conv1.weight", "backbone.layer4.1.sn2.running_var", "classifier.4.weight"):
        assert not torch.equal(after[k], before[k]), k
    assert type(model.backbone.sn1) is FrozenSwitchNorm2d
    assert all(type(m) is FrozenSwitchNorm2d for m in switchnorm_layers(model.backbone.layer1))
    assert not any(type(m) is FrozenSwitchNorm2d for m in switchnorm_layers(model.backbone.layer2))


@pytest.mark.parametrize("trainable_layers, frozen", [
    (0, ["conv1", "sn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]),
    (4, ["conv1", "sn1", "relu", "maxpool"]),
    (5, []),
])
def test_trainable_layers_count_stages_from_layer4_down(trainable_layers, frozen):
    model = small(trainable_layers=trainable_layers)
    with_params = {"conv1", "sn1", "layer1", "layer2", "layer3", "layer4"}
    training = {name.split(".")[1] for name, p in model.named_parameters()
                if name.startswith("backbone.") and p.requires_grad}
    assert training == with_params - set(frozen)  # frozen SN layers hold no parameters at all
    assert all(not p.requires_grad for n in frozen for p in getattr(model.backbone, n).parameters())
    frozen_sn = {name.split(".")[0] for name, m in model.backbone.named_modules() if isinstance(m, FrozenSwitchNorm2d)}
    assert frozen_sn == {n for n in frozen if n in ("sn1", "layer1", "layer2", "layer3", "layer4")}
    assert all(p.requires_grad for p in model.classifier.parameters())


# ------------------------------------------------------------------------------------------------ weights


def test_pretrained_backbone_through_a_manifest_overlay_entry(checkpoint, tmp_path, photos):
    path, state_dict, sha256 = checkpoint
    entry = zoo.get_entry("resnet50v1_sn.in1k_8x4_step100").to_dict()
    entry.pop("name")
    entry.update(architecture=ARCH, default=True, num_classes=10, notes=[])
    entry["norm"].update(using_bn=True, using_moving_average=True, momentum=0.9)
    entry["metrics"] = {"imagenet-1k-val": {"top1": None, "top5": None}}
    entry["sources"] = [{"url": str(path), "kind": "file", "format": "original", "file_name": path.name,
                         "sha256": sha256, "md5": None, "size": None}]
    overlay = tmp_path / "overlay.json"
    overlay.write_text(json.dumps({"schema_version": 1, "entries": {ENTRY: entry}}))
    zoo.set_overlay(overlay)
    for name in (ENTRY, ARCH):  # the entry, and the architecture standing for its default entry
        model = deeplabv3_resnet_sn(num_classes=4, backbone=name, pretrained_backbone=True)
        backbone = backbone_state(model)
        assert backbone and all(torch.equal(backbone[k], state_dict[k]) for k in backbone)
        assert model.classifier[-1].out_channels == 4


def test_using_bn_false_drops_the_bn_term_of_backbone_and_heads(checkpoint):
    path, state_dict, _ = checkpoint
    model = small(backbone_checkpoint=path, using_bn=False, aux_loss=True)
    layers = switchnorm_layers(model)
    assert layers and not any(m.using_bn for m in layers) and model.using_bn is False
    assert not any(k.endswith(("running_mean", "running_var")) for k in model.state_dict())
    assert torch.equal(model.backbone.layer1[0].sn1.mean_weight, state_dict["layer1.0.sn1.mean_weight"][:2])
    assert small(backbone_checkpoint=path).using_bn is True  # None follows the backbone
    # A checkpoint without the BN term (the (8,1) kind) builds without it, and the heads follow.
    no_bn = small(backbone_checkpoint=path, using_bn=False)
    no_bn_file = path.with_name("no-bn.pth")
    torch.save({"fc.weight": state_dict["fc.weight"], "fc.bias": state_dict["fc.bias"], **backbone_state(no_bn)},
               no_bn_file)
    assert not any(m.using_bn for m in switchnorm_layers(small(backbone_checkpoint=no_bn_file)))
    with pytest.raises(ModelConfigError, match="using_bn=True needs a backbone"):
        small(backbone_checkpoint=no_bn_file, using_bn=True)


# ------------------------------------------------------------------------------------------------ builders


@pytest.mark.parametrize("builder, depth, blocks", [(deeplabv3_resnet50_sn, 50, 6), (deeplabv3_resnet101_sn, 101, 23)])
@pytest.mark.parametrize("output_stride, rates, dilation3, dilation4", [(8, (12, 24, 36), 2, 4), (16, (6, 12, 18), 1, 2)])
def test_resnet50_and_101_builders(builder, depth, blocks, output_stride, rates, dilation3, dilation4):
    with torch.device("meta"):  # structure only: nothing allocated
        model = builder(num_classes=21, pretrained_backbone=False, output_stride=output_stride, aux_loss=True)
    assert isinstance(model, DeepLabV3) and model.backbone.depth == depth and len(model.backbone.layer3) == blocks
    assert [c[0].dilation for c in model.classifier[0].convs[1:4]] == [(r, r) for r in rates]
    assert model.backbone.layer3[-1].conv2.dilation == (dilation3, dilation3)
    assert model.backbone.layer4[-1].conv2.dilation == (dilation4, dilation4)
    assert model.backbone.feature_info.channels() == [1024, 2048]
    assert model.aux_classifier[0].in_channels == 1024 and model.classifier[-1].out_channels == 21
    assert SEGMENTATION_MODELS[builder.__name__] is builder


@pytest.mark.parametrize("builder, kwargs, message", [
    (deeplabv3_resnet_sn, {"output_stride": 32}, "output_stride must be 8 or 16"),
    (deeplabv3_resnet_sn, {"output_stride": 4}, "output_stride must be 8 or 16"),
    (deeplabv3_resnet_sn, {"backbone": "resnet20_sn"}, "not an ImageNet SN ResNet"),
    (deeplabv3_resnet_sn, {"backbone": "resnet18v1_bn"}, "not an ImageNet SN ResNet"),
    (deeplabv3_resnet_sn, {"backbone": "resnet20_sn.fmnist_8x2_cos2"}, "not an ImageNet SN ResNet"),
    (deeplabv3_resnet50_sn, {"backbone": "resnet18v1_sn"}, "needs a ResNet-50 backbone"),
    (deeplabv3_resnet101_sn, {"backbone": "resnet50v1_sn"}, "needs a ResNet-101 backbone"),
    (deeplabv3_resnet_sn, {"trainable_layers": 6}, "trainable_layers must be an integer from 0"),
    (deeplabv3_resnet_sn, {"num_classes": 0}, "num_classes must be a positive integer"),
    (deeplabv3_resnet_sn, {"backbone": "resnet50v1_ssn", "using_bn": False}, "Sparse SN layers keep"),
])
def test_bad_arguments_raise_one_clear_error(builder, kwargs, message):
    with pytest.raises(ModelConfigError, match=message) as error:
        with torch.device("meta"):
            builder(**{"pretrained_backbone": False, **kwargs})
    assert "\n" not in str(error.value)


def test_an_unknown_backbone_name_suggests_known_ones():
    with pytest.raises(UnknownModelError, match="resnet18v1_sn"):
        small(backbone="resnet18v1_snn")
