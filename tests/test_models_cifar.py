"""CIFAR ResNets: parameter counts from the layer shapes, key layout, real Fashion-MNIST batches, training."""

import gzip
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import snzoo
from snzoo.models import ResNetCifar, get_architecture, list_architectures
from snzoo.nn import SwitchNorm2d

FASHION_IMAGES = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
FASHION_LABELS = Path("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz")
# Fashion-MNIST training-set pixel statistics, so the batch looks like what a model would be trained on.
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530


@pytest.fixture(scope="module")
def fashion_batch():
    """The first 32 test images (N, 1, 28, 28), normalised, and their labels."""
    if not FASHION_IMAGES.exists():
        pytest.skip(f"Fashion-MNIST not found at {FASHION_IMAGES}")
    n = 32
    with gzip.open(FASHION_IMAGES, "rb") as f:
        raw = f.read(16 + n * 28 * 28)  # idx3 header: magic, count, rows, cols (4 bytes each)
    assert int.from_bytes(raw[:4], "big") == 2051
    images = np.frombuffer(raw[16:], dtype=np.uint8).reshape(n, 1, 28, 28).astype(np.float32) / 255.0
    with gzip.open(FASHION_LABELS, "rb") as f:
        raw = f.read(8 + n)  # idx1 header: magic, count
    assert int.from_bytes(raw[:4], "big") == 2049
    labels = np.frombuffer(raw[8:], dtype=np.uint8).astype(np.int64)
    x = (torch.from_numpy(images) - FASHION_MEAN) / FASHION_STD
    return x, torch.from_numpy(labels)


def expected_parameters(depth: int, in_chans: int, num_classes: int, norm_extra: int = 0) -> int:
    """Parameters of a CIFAR ResNet with projection shortcuts, from the layer shapes.

    Every norm has a per-channel weight and bias (2c); norm_extra is what a norm layer adds on top (SN: its
    3 mean and 3 variance importance weights).
    """
    n = (depth - 2) // 6

    def conv(k, cin, cout):
        return k * k * cin * cout

    def norm(c):
        return 2 * c + norm_extra

    total = conv(3, in_chans, 16) + norm(16)
    cin = 16
    for width in (16, 32, 64):
        for index in range(n):
            total += conv(3, cin, width) + norm(width) + conv(3, width, width) + norm(width)
            if index == 0 and cin != width:
                total += conv(1, cin, width) + norm(width)  # option B projection
            cin = width
    return total + 64 * num_classes + num_classes


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def norm_layers(model: nn.Module) -> list:
    return [m for m in model.modules() if isinstance(m, SwitchNorm2d | nn.BatchNorm2d | nn.GroupNorm)]


def test_parameter_counts_follow_the_layer_shapes():
    bn = get_architecture("resnet20_bn").build(in_chans=3)
    # The published 0.27M of ResNet-20 is 269,722 with option A (parameter-free) shortcuts; the two
    # projections (16->32, 32->64, each 1x1 conv + BN) add 512 + 64 + 2048 + 128.
    assert expected_parameters(20, 3, 10) == 269_722 + 512 + 64 + 2048 + 128 == 272_474
    assert count(bn) == 272_474
    for depth in (20, 32, 56):
        for norm in ("bn", "gn"):
            model = get_architecture(f"resnet{depth}_{norm}").build()
            assert count(model) == expected_parameters(depth, 1, 10), (depth, norm)


@pytest.mark.parametrize("depth", [20, 32, 56])
def test_sn_adds_six_parameters_per_norm_layer(depth):
    sn = get_architecture(f"resnet{depth}_sn").build()
    bn = get_architecture(f"resnet{depth}_bn").build()
    layers = norm_layers(sn)
    blocks = 3 * (depth - 2) // 6
    assert len(layers) == 1 + 2 * blocks + 2  # stem, two per block, two projections
    assert all(isinstance(m, SwitchNorm2d) for m in layers)
    assert count(sn) - count(bn) == 6 * len(layers) == expected_parameters(depth, 1, 10, 6) - count(bn)


def test_key_names_and_shapes():
    sd = get_architecture("resnet20_sn").build().state_dict()
    expected = {
        "conv1.weight": (16, 1, 3, 3), "sn1.weight": (1, 16, 1, 1), "sn1.mean_weight": (3,),
        "sn1.running_mean": (1, 16, 1), "layer1.0.conv1.weight": (16, 16, 3, 3),
        "layer1.2.sn2.var_weight": (3,), "layer2.0.conv1.weight": (32, 16, 3, 3),
        "layer2.0.downsample.0.weight": (32, 16, 1, 1), "layer2.0.downsample.1.weight": (1, 32, 1, 1),
        "layer3.0.downsample.0.weight": (64, 32, 1, 1), "layer3.2.sn2.weight": (1, 64, 1, 1),
        "fc.weight": (10, 64), "fc.bias": (10,),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert not any(k.startswith("layer1.0.downsample") or k.startswith("layer4") for k in sd)
    assert not any("layer" in k and ".3." in k for k in sd)  # resnet20: three blocks per stage
    # 21 SN layers of 6 tensors, 21 convs (19 3x3 + 2 projections), fc weight and bias.
    assert len(sd) == 21 * 6 + 21 + 2
    bn_sd = get_architecture("resnet20_bn").build().state_dict()
    sn_convs = {k for k in sd if "conv" in k or "fc" in k or "downsample.0" in k}
    assert sn_convs <= set(bn_sd)


def test_strides_and_no_max_pool():
    model = get_architecture("resnet32_bn").build()
    assert model.conv1.stride == (1, 1) and model.conv1.kernel_size == (3, 3)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert [len(layer) for layer in (model.layer1, model.layer2, model.layer3)] == [5, 5, 5]
    assert model.layer2[0].conv1.stride == (2, 2) and model.layer2[0].downsample[0].stride == (2, 2)
    assert model.layer3[1].conv1.stride == (1, 1) and model.layer3[1].downsample is None


@pytest.mark.parametrize("arch", ["resnet20_sn", "resnet20_bn", "resnet20_gn", "resnet32_sn"])
def test_forward_on_fashion_mnist_in_train_and_eval(arch, fashion_batch):
    x, _ = fashion_batch
    torch.manual_seed(0)
    model = get_architecture(arch).build()
    with torch.no_grad():
        model.train()
        train_out = model(x)
        model.eval()
        eval_out = model(x)
        features = model.forward_features(x)
    for out in (train_out, eval_out):
        assert out.shape == (32, 10) and torch.isfinite(out).all()
    assert features.shape == (32, 64, 7, 7)
    assert train_out.std(0).mean() > 0  # the logits depend on the image


def test_three_channel_32x32_inputs():
    model = get_architecture("resnet56_sn").build(in_chans=3, num_classes=100).eval()
    assert tuple(model.conv1.weight.shape) == (16, 3, 3, 3)
    with torch.no_grad():
        x = torch.randn(2, 3, 32, 32)
        assert model.forward_features(x).shape == (2, 64, 8, 8)
        out = model(x)
    assert out.shape == (2, 100) and torch.isfinite(out).all()


def test_last_gamma_zeroes_sn2_of_every_block():
    for norm in ("sn", "bn", "gn"):
        model = get_architecture(f"resnet20_{norm}").build()
        blocks = [b for layer in (model.layer1, model.layer2, model.layer3) for b in layer]
        assert len(blocks) == 9
        for block in blocks:
            assert torch.all(block.sn2.weight == 0) and torch.all(block.sn1.weight == 1), norm
        assert torch.all(model.sn1.weight == 1) and torch.all(model.layer2[0].downsample[1].weight == 1)
    off = get_architecture("resnet20_sn").build(last_gamma=False)
    assert all(torch.all(m.weight == 1) for m in norm_layers(off))


def test_norm_defaults_and_arguments():
    sn = get_architecture("resnet20_sn").build()
    assert all(m.momentum == 0.9 and m.using_bn and m.using_moving_average for m in norm_layers(sn))
    gn = get_architecture("resnet20_gn").build()
    assert {m.num_groups for m in norm_layers(gn)} == {8}
    bn = get_architecture("resnet20_bn").build()
    assert all(abs(m.momentum - 0.1) < 1e-12 for m in norm_layers(bn))
    custom = get_architecture("resnet20_sn").build(momentum=0.997, using_bn=False, using_moving_average=False, eps=1e-3)
    layers = norm_layers(custom)
    assert all(m.momentum == 0.997 and not m.using_bn and not m.using_moving_average for m in layers)
    assert all(m.eps == 1e-3 for m in layers)
    assert isinstance(sn.dropout, nn.Dropout) and sn.drop_rate == 0.0 == sn.dropout.p
    assert get_architecture("resnet20_bn").build(drop_rate=0.2).dropout.p == 0.2
    assert (sn.depth, sn.version, sn.norm, sn.num_features, sn.num_classes) == (20, 1, "sn", 64, 10)
    assert sn.norm_config == {"type": "sn", "using_bn": True, "using_moving_average": True, "momentum": 0.9,
                              "last_gamma": True}
    with pytest.raises(ValueError, match="depth must be 6n\\+2"):
        ResNetCifar(depth=21)


def test_conv_init_follows_the_fan_out_rule():
    torch.manual_seed(0)
    model = get_architecture("resnet56_bn").build()
    weights = torch.cat([b.conv2.weight.flatten() for b in model.layer3])  # 9 convs 3x3, 64 out
    expected_std = math.sqrt(2.0 / (3 * 3 * 64))
    assert abs(weights.std().item() - expected_std) / expected_std < 0.01
    projection = model.layer3[0].downsample[0].weight
    assert abs(projection.std().item() - math.sqrt(2.0 / 64)) / math.sqrt(2.0 / 64) < 0.1


def test_forward_head_and_reset_classifier(fashion_batch):
    x, _ = fashion_batch
    model = get_architecture("resnet20_sn").build().eval()
    with torch.no_grad():
        features = model.forward_features(x)
        pooled = model.forward_head(features, pre_logits=True)
        assert torch.allclose(pooled, features.mean((2, 3)), atol=1e-6)
        assert torch.allclose(model(x), model.fc(pooled), atol=1e-5)
    assert model.get_classifier() is model.fc
    conv_before = model.conv1.weight.clone()
    model.reset_classifier(5)
    assert model.fc.out_features == 5 and model.num_classes == 5
    assert torch.equal(model.conv1.weight, conv_before)
    model.reset_classifier(0)
    assert isinstance(model.get_classifier(), nn.Identity)
    with torch.no_grad():
        assert model(x).shape == (32, 64)


def test_registry_and_create_model():
    assert snzoo.list_models("resnet20*") == ["resnet20_bn", "resnet20_gn", "resnet20_sn"]
    assert {"resnet32_sn", "resnet56_bn", "resnet56_gn"} <= set(list_architectures())
    spec = get_architecture("resnet56_gn")
    assert (spec.depth, spec.version, spec.norm) == (56, 1, "gn")
    model = snzoo.create_model("resnet20_sn", num_classes=10)
    assert isinstance(model, ResNetCifar) and model.architecture == "resnet20_sn"
    assert model.fc.out_features == 10 and isinstance(model.sn1, SwitchNorm2d)


@pytest.mark.parametrize("norm", ["sn", "bn", "gn"])
def test_one_sgd_step_decreases_the_loss(norm, fashion_batch):
    x, y = fashion_batch
    torch.manual_seed(0)
    model = get_architecture(f"resnet20_{norm}").build().train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    loss = nn.functional.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    optimizer.step()
    with torch.no_grad():
        after = nn.functional.cross_entropy(model(x), y)
    assert after < loss.detach() - 1e-3
