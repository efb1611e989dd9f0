"""Architectures: the original's module tree and key counts, init, pooling, heads, and the baselines."""

import math

import pytest
import torch
from torch import nn

from snzoo.models import ResNet, get_architecture, list_architectures
from snzoo.nn import SparseSwitchNorm2d, SwitchNorm2d

# Counts measured from the original definitions (shared reference facts).
ORIGINAL_COUNTS = [
    ("resnet50v1_sn", {}, 373, 25_557_350),
    ("resnet50v1_sn", {"using_bn": False}, 267, 25_557_244),
    ("resnet101v1_sn", {}, 730, 44_549_784),
    ("resnet50v2_sn", {}, 355, 25_549_780),
    ("resnet101v2_sn", {}, 712, 44_542_214),
    ("resnet50v1_ssn", {}, 532, None),
]


@pytest.mark.parametrize("arch,kwargs,keys,params", ORIGINAL_COUNTS)
def test_key_and_parameter_counts_match_the_original(arch, kwargs, keys, params):
    model = get_architecture(arch).build(**kwargs)
    assert len(model.state_dict()) == keys
    if params is not None:
        assert sum(p.numel() for p in model.parameters()) == params


def test_resnet50v1_sn_has_the_original_key_names_and_shapes():
    sd = get_architecture("resnet50v1_sn").build().state_dict()
    assert list(sd)[:7] == [
        "conv1.weight", "sn1.weight", "sn1.bias", "sn1.mean_weight", "sn1.var_weight",
        "sn1.running_mean", "sn1.running_var",
    ]
    expected = {
        "conv1.weight": (64, 3, 7, 7), "sn1.weight": (1, 64, 1, 1), "sn1.mean_weight": (3,),
        "sn1.running_mean": (1, 64, 1), "layer1.0.conv1.weight": (64, 64, 1, 1),
        "layer1.0.conv3.weight": (256, 64, 1, 1), "layer1.0.sn3.var_weight": (3,),
        "layer1.0.downsample.0.weight": (256, 64, 1, 1), "layer1.0.downsample.1.running_var": (1, 256, 1),
        "layer4.2.sn3.weight": (1, 2048, 1, 1), "fc.weight": (1000, 2048), "fc.bias": (1000,),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert not any("num_batches_tracked" in k for k in sd)
    # Stride sits on the 3x3 conv ("v1.5").
    model = get_architecture("resnet50v1_sn").build()
    assert model.layer2[0].conv2.stride == (2, 2) and model.layer2[0].conv1.stride == (1, 1)


def test_v2_keys_bare_downsample_and_sn_out():
    sd = get_architecture("resnet50v2_sn").build().state_dict()
    assert tuple(sd["layer1.0.downsample.weight"].shape) == (256, 64, 1, 1)
    assert "layer1.0.downsample.0.weight" not in sd
    assert tuple(sd["sn_out.weight"].shape) == (1, 2048, 1, 1)
    assert tuple(sd["layer1.0.sn1.weight"].shape) == (1, 64, 1, 1)  # pre-activation of the block input


def test_ssn_model_uses_sparse_layers_and_ceil_mode_pool():
    model = get_architecture("resnet50v1_ssn").build()
    norms = [m for m in model.modules() if isinstance(m, SwitchNorm2d | SparseSwitchNorm2d)]
    assert norms and all(isinstance(m, SparseSwitchNorm2d) for m in norms)
    assert model.maxpool.ceil_mode and model.maxpool.padding == 0
    assert all(m.momentum == 0.997 for m in norms)
    assert len(model.state_dict()) == 53 * 9 + 53 + 2


def test_last_gamma_zeroes_only_the_last_norm_of_each_block():
    model = get_architecture("resnet50v1_sn").build()
    for block in [b for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for b in layer]:
        assert torch.all(block.sn3.weight == 0)
        assert torch.all(block.sn1.weight == 1) and torch.all(block.sn2.weight == 1)
    assert torch.all(model.layer1[0].downsample[1].weight == 1)
    basic = get_architecture("resnet18v1_sn").build()
    assert torch.all(basic.layer1[0].sn2.weight == 0) and torch.all(basic.layer1[0].sn1.weight == 1)
    v2 = get_architecture("resnet50v2_sn").build()
    assert all(torch.all(m.weight == 1) for m in v2.modules() if isinstance(m, SwitchNorm2d))


def test_conv_init_follows_the_original_fan_out_rule():
    torch.manual_seed(0)
    model = get_architecture("resnet101v1_sn").build()
    conv = model.layer3[5].conv2  # 3x3, 256 out: 589,824 samples
    expected_std = math.sqrt(2.0 / (3 * 3 * 256))
    assert abs(conv.weight.std().item() - expected_std) / expected_std < 0.01
    assert abs(conv.weight.mean().item()) < 0.01 * expected_std * 10


@pytest.mark.parametrize("arch", list_architectures())
def test_every_architecture_builds_and_runs_on_small_inputs(arch):
    model = get_architecture(arch).build(num_classes=7, in_chans=3)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


def test_adaptive_pooling_accepts_other_input_sizes_and_in_chans():
    model = get_architecture("resnet18v1_sn").build(num_classes=3, in_chans=1).eval()
    with torch.no_grad():
        for size in (32, 61, 96):
            assert model(torch.randn(1, 1, size, size)).shape == (1, 3)


def test_forward_features_head_and_reset_classifier():
    model = get_architecture("resnet50v1_sn").build().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (2, 2048, 2, 2)
        pooled = model.forward_head(features, pre_logits=True)
        assert torch.allclose(pooled, features.mean((2, 3)), atol=1e-6)
        assert torch.allclose(model(x), model.fc(pooled), atol=1e-5)
    conv_before = model.conv1.weight.clone()
    model.reset_classifier(5)
    assert model.fc.out_features == 5 and model.num_classes == 5
    assert torch.equal(model.conv1.weight, conv_before)
    model.reset_classifier(0)
    with torch.no_grad():
        assert model(x).shape == (2, 2048)


def test_dropout_is_active_in_training_only():
    model = get_architecture("resnet18v1_bn").build(num_classes=4)
    assert isinstance(model.dropout, nn.Dropout) and model.dropout.p == 0.5
    assert not any("dropout" in k for k in model.state_dict())


def test_baselines_share_key_layout_and_use_their_norms():
    bn = get_architecture("resnet50v1_bn").build()
    gn = get_architecture("resnet50v1_gn").build()
    assert isinstance(bn.sn1, nn.BatchNorm2d) and abs(bn.sn1.momentum - 0.1) < 1e-12
    assert isinstance(gn.layer1[0].sn2, nn.GroupNorm) and gn.layer1[0].sn2.num_groups == 32
    assert torch.all(bn.layer2[1].sn3.weight == 0)  # last_gamma applies to the baselines too
    sn_convs = {k for k in get_architecture("resnet50v1_sn").build().state_dict() if "conv" in k or "fc" in k}
    assert sn_convs <= set(bn.state_dict()) and sn_convs <= set(gn.state_dict())


def test_norm_arguments_reach_every_layer():
    model = get_architecture("resnet50v1_sn").build(momentum=0.997, using_moving_average=False, using_bn=False)
    layers = [m for m in model.modules() if isinstance(m, SwitchNorm2d)]
    assert len(layers) == 53
    assert all(m.momentum == 0.997 and not m.using_moving_average and not m.using_bn for m in layers)
    with pytest.raises(ValueError, match="using_bn=False applies to norm 'sn' only"):
        get_architecture("resnet50v1_bn").build(using_bn=False)
    with pytest.raises(ValueError, match="depth must be one of"):
        ResNet(depth=42)
