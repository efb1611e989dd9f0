"""snzoo.detection: torchvision's Faster / Mask R-CNN with SN backbones, FPN and heads, on real photographs.

Small settings keep it fast: a resnet18v1_sn backbone, images of about 128 pixels, few proposals and RoIs. Only
one test builds the full R-50 FPN configurations, and it does not run them.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, TwoMLPHead
from torchvision.ops.misc import Conv2dNormActivation

import snzoo
from snzoo import zoo
from snzoo.detection import (
    DETECTION_MODELS,
    fasterrcnn_resnet50_fpn_sn,
    fasterrcnn_resnet_fpn_sn,
    maskrcnn_resnet50_fpn_sn,
    maskrcnn_resnet_fpn_sn,
    sn_resnet_fpn_backbone,
)
from snzoo.errors import ModelConfigError, SnzooError, UnknownModelError
from snzoo.nn import FrozenSwitchNorm2d, SwitchNorm2d, switchnorm_layers

try:  # tests/ as a package or as a plain directory on sys.path
    from . import reference_sn as ref
    from .photos import photo_paths
    from .sn_testing import TOL64, randomise, to_numpy
except ImportError:
    import reference_sn as ref
    from photos import photo_paths
    from sn_testing import TOL64, randomise, to_numpy

pytestmark = pytest.mark.usefixtures("one_thread")

ARCH = "resnet18v1_sn"
# Few proposals and RoIs: the conv heads run on every sampled RoI.
FAST = dict(min_size=112, max_size=128, rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=64,
            rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=32, box_batch_size_per_image=32,
            box_detections_per_img=10)
BUILDERS = {"faster": fasterrcnn_resnet_fpn_sn, "mask": maskrcnn_resnet_fpn_sn}


@pytest.fixture(scope="module")
def photos() -> list[torch.Tensor]:
    """Two real photographs, about 128 pixels on the long side, values in [0, 1]."""
    images = []
    for path in photo_paths()[:2]:
        image = Image.open(path).convert("RGB")
        image.thumbnail((128, 128))
        images.append(TF.to_tensor(image))
    return images


def targets_for(photos: list[torch.Tensor]) -> list[dict]:
    """A few boxes per photograph; each mask is the rectangle inside its box, inset by 2 pixels."""
    targets = []
    for k, image in enumerate(photos):
        h, w = image.shape[1:]
        boxes = torch.tensor([[0.1 * w, 0.2 * h, 0.6 * w, 0.9 * h], [0.5 * w, 0.1 * h, 0.95 * w, 0.5 * h]][: 2 - k])
        masks = torch.zeros(len(boxes), h, w, dtype=torch.uint8)
        for mask, (x0, y0, x1, y1) in zip(masks, boxes.round().int().tolist()):
            mask[y0 + 2: y1 - 2, x0 + 2: x1 - 2] = 1
        targets.append({"boxes": boxes, "labels": torch.tensor([1, 2][: len(boxes)]), "masks": masks})
    return targets


def small(kind: str, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    return BUILDERS[kind](num_classes=3, backbone=ARCH, pretrained_backbone=False, **{**FAST, **kwargs})


def body_sn_states(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.backbone.body.state_dict().items()}


# ------------------------------------------------------------------------------------------ train and eval


@pytest.mark.parametrize("kind", ["faster", "mask"])
def test_train_step_gives_finite_losses_and_gradients_then_eval_gives_detections(kind, photos):
    model = small(kind)
    model.train()
    losses = model(photos, targets_for(photos))
    expected = {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert set(losses) == expected | ({"loss_mask"} if kind == "mask" else set())
    assert all(torch.isfinite(v) and v > 0 for v in losses.values()), losses
    sum(losses.values()).backward()
    fpn_sn = model.backbone.fpn.layer_blocks[0][1]
    for parameter in (fpn_sn.mean_weight, model.backbone.body.layer4[0].downsample[0].weight,
                      model.roi_heads.box_predictor.cls_score.weight):
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all() and parameter.grad.abs().sum() > 0

    model.eval()
    model.roi_heads.score_thresh = 0.0  # an untrained model: keep every box
    with torch.no_grad():
        outputs = model(photos)
    for image, out in zip(photos, outputs):
        n = len(out["boxes"])
        assert 0 < n <= FAST["box_detections_per_img"] and out["boxes"].shape == (n, 4)
        assert out["labels"].shape == out["scores"].shape == (n,) and set(out["labels"].tolist()) <= {1, 2}
        if kind == "mask":
            assert out["masks"].shape == (n, 1, *image.shape[1:])
            assert 0 <= out["masks"].min() and out["masks"].max() <= 1
    model.roi_heads.score_thresh = 1.0  # nothing detected: the SN mask head gets an empty batch
    with torch.no_grad():
        empty = model(photos)
    assert all(len(out["boxes"]) == 0 for out in empty)
    if kind == "mask":
        assert empty[0]["masks"].shape == (0, 1, *photos[0].shape[1:])


def test_switchnorm_takes_an_empty_batch_in_train_and_eval_mode():
    layer = randomise(SwitchNorm2d(8), buffers=True)
    before = layer.running_mean.clone()
    for training in (True, False):
        out = layer.train(training)(torch.zeros(0, 8, 5, 5, requires_grad=True))
        assert out.shape == (0, 8, 5, 5)
        out.sum().backward()
    assert torch.equal(layer.running_mean, before) and torch.equal(layer.weight.grad, torch.zeros_like(layer.weight))


# ------------------------------------------------------------------------------------ configuration facts


def sn_count(module: nn.Module) -> int:
    return len(switchnorm_layers(module))


def test_r50_builders_mirror_the_original_configs():
    assert set(DETECTION_MODELS) == {"fasterrcnn_resnet50_fpn_sn", "maskrcnn_resnet50_fpn_sn",
                                     "fasterrcnn_resnet_fpn_sn", "maskrcnn_resnet_fpn_sn"}
    faster = fasterrcnn_resnet50_fpn_sn(pretrained_backbone=False)  # the (8,2) entry: SN with BN, 2-fc head
    mask = maskrcnn_resnet50_fpn_sn(pretrained_backbone=False)  # the (8,1) entry: SN without BN everywhere
    faster81 = DETECTION_MODELS["fasterrcnn_resnet50_fpn_sn"](backbone="resnet50v1_sn.in1k_8x1_detectron",
                                                               pretrained_backbone=False)
    assert isinstance(faster, FasterRCNN) and isinstance(mask, MaskRCNN)
    for model in (faster, mask, faster81):
        heads = model.roi_heads
        assert sn_count(model.backbone.fpn) == 8 and model.backbone.out_channels == 256
        assert heads.box_roi_pool.output_size == (7, 7) and heads.box_roi_pool.sampling_ratio == 2
        assert heads.box_roi_pool.featmap_names == ["0", "1", "2", "3"]
        assert model.transform.min_size == (800,) and model.transform.max_size == 1333
        assert model.transform.image_mean == [0.485, 0.456, 0.406]
        assert model.transform.image_std == [0.229, 0.224, 0.225]
        assert heads.box_predictor.cls_score.out_features == 91
        assert all(layer.momentum == 0.997 for layer in switchnorm_layers(model))
        body = model.backbone.body
        assert sn_count(body) == 53 and len(body.layer2) == 4 and len(body.layer3) == 6  # ResNet-50
    assert isinstance(faster.roi_heads.box_head, TwoMLPHead) and sn_count(faster.roi_heads.box_head) == 0
    assert faster.box_head_kind == "2mlp"
    assert all(layer.using_bn and layer.running_mean is not None for layer in switchnorm_layers(faster))
    for model in (mask, faster81):
        assert isinstance(model.roi_heads.box_head, FastRCNNConvFCHead) and sn_count(model.roi_heads.box_head) == 4
        assert model.box_head_kind == "4conv1fc"
        for layer in switchnorm_layers(model):
            assert not layer.using_bn and layer.mean_weight.numel() == 2
            assert not any(name.startswith("running") for name, _ in layer.named_buffers()), layer
    heads = mask.roi_heads
    assert sn_count(heads.mask_head) == 4
    assert heads.mask_roi_pool.output_size == (14, 14) and heads.mask_roi_pool.sampling_ratio == 2
    with torch.no_grad():
        assert heads.mask_predictor(torch.zeros(1, 256, 14, 14)).shape == (1, 91, 28, 28)
    # Stem and layer1 frozen (FREEZE_AT 2), layer2..4 train.
    body = mask.backbone.body
    assert isinstance(body.sn1, FrozenSwitchNorm2d) and not body.conv1.weight.requires_grad
    assert all(isinstance(m, FrozenSwitchNorm2d) for m in switchnorm_layers(body.layer1))
    assert not any(isinstance(m, FrozenSwitchNorm2d) for m in switchnorm_layers(body.layer2))
    assert all(p.requires_grad for p in body.layer2.parameters())


def test_using_bn_false_drops_the_bn_term_of_a_bn_backbone_too(photos):
    model = small("faster", using_bn=False)
    assert model.box_head_kind == "4conv1fc"
    layers = switchnorm_layers(model)
    assert len(layers) == sn_count(model.backbone.body) + 8 + 4
    assert all(not layer.using_bn and "running_mean" not in layer.state_dict() for layer in layers)
    assert small("faster", box_head="4conv1fc").box_head_kind == "4conv1fc"


# -------------------------------------------------------------------------------------------- exactness


def test_fpn_and_head_norms_are_snzoo_switchnorm_equal_to_the_float64_reference(photos):
    model = small("mask", seed=1)
    for part in (model.backbone.fpn, model.roi_heads.box_head, model.roi_heads.mask_head):
        blocks = [m for m in part.modules() if isinstance(m, Conv2dNormActivation)]
        assert blocks and all(type(block[1]) is SwitchNorm2d for block in blocks)
    norms = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    assert not any(isinstance(m, norms) for m in model.modules())

    model = model.double().train()
    layer = randomise(model.backbone.fpn.layer_blocks[1][1], seed=3, buffers=True)
    running = to_numpy(layer.running_mean), to_numpy(layer.running_var)
    with torch.no_grad():
        maps = model.backbone.body(torch.stack([TF.resize(p, [96, 96]) for p in photos]).double())
        x = model.backbone.fpn.layer_blocks[1][0](model.backbone.fpn.inner_blocks[1](maps[1]))  # a real FPN map
        y = layer(x)
    expected, mean, var = ref.switch_norm(to_numpy(x), to_numpy(layer.weight), to_numpy(layer.bias),
                                          to_numpy(layer.mean_weight), to_numpy(layer.var_weight), *running,
                                          training=True, momentum=0.997, using_bn=True)
    np.testing.assert_allclose(to_numpy(y), expected, **TOL64)
    np.testing.assert_allclose(to_numpy(layer.running_mean), mean, **TOL64)
    np.testing.assert_allclose(to_numpy(layer.running_var), var, **TOL64)


@pytest.mark.parametrize("arch", [ARCH, "resnet18v2_sn"])
def test_body_features_equal_the_classifiers_with_the_same_weights(arch, photos):
    torch.manual_seed(2)
    # Frozen stages compute the eval formulation in either mode; v2's sn_out trains with layer4.
    trainable = 3 if arch == ARCH else 1
    body = fasterrcnn_resnet_fpn_sn(num_classes=3, backbone=arch, pretrained_backbone=False,
                                    trainable_layers=trainable, **FAST).backbone.body.eval()
    if arch != ARCH:
        assert all(p.requires_grad for p in body.sn_out.parameters())
        assert not any(p.requires_grad for p in body.layer3.parameters())
    state = body.state_dict()
    trunk = snzoo.create_model(arch, features_only=True, out_indices=(1, 2, 3, 4))
    trunk.load_state_dict(state)
    classifier = snzoo.create_model(arch)
    missing, unexpected = classifier.load_state_dict(state, strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected
    x = torch.stack([TF.resize(p, [96, 128]) for p in photos])
    with torch.no_grad():
        ours = body(x)
        theirs = trunk.eval()(x)
        intermediates = classifier.eval().forward_intermediates(x, indices=[1, 2, 3, 4], intermediates_only=True)
    assert [m.shape[1] for m in ours] == [64, 128, 256, 512]
    for a, b, c in zip(ours, theirs, intermediates):
        assert torch.equal(a, b) and torch.equal(a, c)


# ------------------------------------------------------------------------------------------------- weights


@pytest.fixture
def weights_file(tmp_path):
    """Seeded random resnet18v1_sn weights in the original release's format, every tensor non-trivial."""
    torch.manual_seed(5)
    model = snzoo.create_model(ARCH)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith(("mean_weight", "var_weight", "running_mean", "bias")):
                tensor.normal_()
            if name.endswith(("running_var", ".weight")) and "conv" not in name and "fc" not in name:
                tensor.uniform_(0.5, 1.5)
    path = tmp_path / "ResNet18v1+SN-det.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, path)
    return path, model.state_dict()


def test_pretrained_backbone_from_a_zoo_entry_and_from_a_checkpoint(weights_file, tmp_path):
    path, tensors = weights_file
    entry = zoo.get_entry("resnet50v1_sn.in1k_8x4_step100").to_dict()
    entry.pop("name")
    entry.update(architecture=ARCH, default=True, notes=[])
    entry["metrics"] = {"imagenet-1k-val": {"top1": None, "top5": None}}
    entry["eval"].update(mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3])
    entry["sources"] = [{"url": str(path), "kind": "file", "format": "original", "file_name": path.name,
                         "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "md5": None, "size": None}]
    overlay = tmp_path / "overlay.json"
    overlay.write_text(json.dumps({"schema_version": 1, "entries": {f"{ARCH}.test_det": entry}}))
    zoo.set_overlay(overlay)

    from_entry = fasterrcnn_resnet_fpn_sn(num_classes=3, backbone=f"{ARCH}.test_det", **FAST)
    from_file = sn_resnet_fpn_backbone(ARCH, pretrained_backbone=False, trainable_layers=3, using_bn=None,
                                       backbone_checkpoint=path)
    for body in (from_entry.backbone.body, from_file.body):
        state = body.state_dict()
        assert set(state) == {k for k in tensors if not k.startswith("fc.")}
        assert all(torch.equal(state[k], tensors[k]) for k in state)
        assert isinstance(body.sn1, FrozenSwitchNorm2d)  # frozen layers keep the keys
    assert from_entry.transform.image_mean == [0.5, 0.4, 0.3]
    assert from_entry.transform.image_std == [0.2, 0.25, 0.3]


# ---------------------------------------------------------------------------------------------- frozen stages


def test_a_train_step_changes_nothing_in_the_frozen_stages(photos):
    model = small("faster", seed=4, trainable_layers=3)
    before = body_sn_states(model)
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = model(photos, targets_for(photos))
    sum(losses.values()).backward()
    optimizer.step()
    after = model.backbone.body.state_dict()
    frozen = [k for k in before if k.startswith(("conv1.", "sn1.", "layer1."))]
    assert len(frozen) == 7 + 2 * 2 * 7  # conv1 + sn1's 6 tensors, then 2 blocks of 2 (conv + SN)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert not changed & set(frozen), sorted(changed & set(frozen))
    for stage in ("layer2", "layer3", "layer4"):
        # Zero-initialised last gammas (last_gamma) leave the branch's first conv without gradient at step 1.
        assert {f"{stage}.0.{key}" for key in ("downsample.0.weight", "sn2.weight", "sn1.running_mean")} <= changed
    assert all(p.requires_grad for p in model.backbone.body.layer2.parameters())


def test_trainable_layers_five_freezes_nothing_and_zero_freezes_the_body():
    free = small("faster", trainable_layers=5).backbone.body
    assert all(p.requires_grad for p in free.parameters())
    assert not any(isinstance(m, FrozenSwitchNorm2d) for m in free.modules())
    frozen = small("faster", trainable_layers=0).backbone.body
    assert not any(p.requires_grad for p in frozen.parameters())
    assert all(isinstance(m, FrozenSwitchNorm2d) for m in switchnorm_layers(frozen))
    two = small("faster", trainable_layers=2).backbone.body
    assert not any(p.requires_grad for p in two.layer2.parameters())
    assert all(p.requires_grad for p in two.layer3.parameters())


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("call, error, words", [
    (lambda: fasterrcnn_resnet_fpn_sn(backbone="resnet20_sn", pretrained_backbone=False), ModelConfigError,
     "not an ImageNet SN ResNet"),
    (lambda: fasterrcnn_resnet_fpn_sn(backbone="resnet50v1_bn", pretrained_backbone=False), ModelConfigError,
     "not an ImageNet SN ResNet"),
    (lambda: maskrcnn_resnet_fpn_sn(backbone="resnet18v1_gn", pretrained_backbone=False), ModelConfigError,
     "not an ImageNet SN ResNet"),
    (lambda: fasterrcnn_resnet_fpn_sn(backbone="vit_base_sn", pretrained_backbone=False), UnknownModelError,
     "unknown architecture"),
    (lambda: fasterrcnn_resnet50_fpn_sn(backbone="resnet18v1_sn", pretrained_backbone=False), ModelConfigError,
     "depth-50"),
    (lambda: maskrcnn_resnet50_fpn_sn(trainable_layers=6, pretrained_backbone=False), ModelConfigError,
     "from 0"),
    (lambda: fasterrcnn_resnet50_fpn_sn(box_head="x", pretrained_backbone=False), ModelConfigError,
     "box_head must be one of"),
    (lambda: fasterrcnn_resnet_fpn_sn(backbone="resnet50v1_ssn", using_bn=False, pretrained_backbone=False),
     ModelConfigError, "Sparse SN"),
])
def test_bad_input_is_one_clear_error(call, error, words):
    with pytest.raises(error) as raised:
        call()
    assert isinstance(raised.value, SnzooError)
    message = str(raised.value)
    assert words in message and "\n" not in message
