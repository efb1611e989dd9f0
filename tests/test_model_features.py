"""Backbone use: features_only / out_indices, feature_info, forward_intermediates, output_stride, in_chans from
pretrained weights, device / dtype of the SN layers, and building on the meta device."""

import math

import pytest
import torch
from torch import nn

import snzoo
from snzoo.hub import export_hf
from snzoo.models import FeatureInfo, FeatureListNet, adapt_input_conv, get_architecture, list_architectures
from snzoo.models.resnet import LAYERS
from snzoo.nn import SparseSwitchNorm2d, SwitchNorm1d, SwitchNorm2d, SwitchNorm3d, SyncSwitchNorm2d
from photos import photo_batch

pytestmark = pytest.mark.usefixtures("one_thread")

REDUCTIONS = {32: [2, 4, 8, 16, 32], 16: [2, 4, 8, 16, 16], 8: [2, 4, 8, 8, 8]}


def expected_channels(depth: int) -> list[int]:
    return [64, 64, 128, 256, 512] if depth < 50 else [64, 256, 512, 1024, 2048]


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Move every tensor away from its initial value (running variances stay positive), so a lost or
    mis-assigned tensor changes the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            noise = torch.rand(tensor.shape, generator=generator, dtype=tensor.dtype)
            if key.endswith("running_var"):
                tensor.copy_(noise + 0.5)
            elif key.endswith(("running_mean", "bias", "mean_weight", "var_weight")):
                tensor.copy_(noise - 0.5)
            elif key.endswith("conv1.weight") or ".conv" in key or "downsample" in key or key.startswith("fc."):
                tensor.mul_(0.5 + noise)
            else:  # norm gammas
                tensor.copy_(noise + 0.5)
    return model


def save_checkpoint(model: nn.Module, path) -> str:
    torch.save({"state_dict": model.state_dict()}, path)
    return str(path)


# ---- channels and reductions ----------------------------------------------------------------------------------

@pytest.mark.parametrize("output_stride", [32, 16, 8])
@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("depth", sorted(LAYERS))
def test_feature_maps_have_the_channels_and_reductions_feature_info_states(depth, version, output_stride):
    with torch.device("meta"):
        model = snzoo.create_model(f"resnet{depth}v{version}_sn", features_only=True, output_stride=output_stride)
        maps = model(torch.empty(1, 3, 64, 64))
    assert isinstance(model, FeatureListNet)
    assert model.feature_info.channels() == expected_channels(depth)
    assert model.feature_info.reduction() == REDUCTIONS[output_stride]
    assert [m.shape[1] for m in maps] == expected_channels(depth)
    assert [tuple(m.shape[2:]) for m in maps] == [(64 // r, 64 // r) for r in REDUCTIONS[output_stride]]


@pytest.mark.parametrize("name", ["resnet18v1_bn", "resnet50v1_ssn", "resnet34v2_gn"])
def test_baseline_and_ssn_backbones_on_a_photograph(name):
    model = snzoo.create_model(name, features_only=True, out_indices=(1, 2, 3, 4), output_stride=16).eval()
    with torch.no_grad():
        maps = model(photo_batch(64, 1))
    depth = int(name[6:8])
    assert model.feature_info.channels() == expected_channels(depth)[1:] == [m.shape[1] for m in maps]
    assert model.feature_info.reduction() == [4, 8, 16, 16]
    assert [m.shape[-1] for m in maps] == [16, 8, 4, 4]
    assert model.feature_info.module_name() == ["layer1", "layer2", "layer3", "layer4" if "v1" in name else "sn_out"]


@pytest.mark.parametrize("depth", [20, 32, 56])
def test_cifar_resnets_stem_and_three_stages(depth):
    with torch.device("meta"):
        model = snzoo.create_model(f"resnet{depth}_sn", features_only=True)
        maps = model(torch.empty(2, 1, 28, 28))
    assert model.feature_info.channels() == [16, 16, 32, 64]
    assert model.feature_info.reduction() == [1, 1, 2, 4]
    assert [tuple(m.shape) for m in maps] == [(2, 16, 28, 28), (2, 16, 28, 28), (2, 32, 14, 14), (2, 64, 7, 7)]
    with pytest.raises(ValueError, match="0..3"):
        snzoo.create_model(f"resnet{depth}_sn", features_only=True, out_indices=(4,))


def test_feature_info_follows_timm():
    info = snzoo.create_model("resnet18v1_sn", features_only=True, out_indices=(4, 1)).feature_info
    assert isinstance(info, FeatureInfo) and info.out_indices == (4, 1)
    assert info.channels() == [512, 64] and info.reduction() == [32, 4]
    assert info.module_name() == ["layer4", "layer1"]
    assert info.channels(0) == 64 and info.reduction([0, 2]) == [2, 8]  # idx picks stages by their own index
    assert info.get_dicts(keys=["num_chs", "reduction"]) == [{"num_chs": 512, "reduction": 32},
                                                               {"num_chs": 64, "reduction": 4}]
    assert info.get_dicts()[0]["module"] == "layer4" and len(info) == 5 and info[0]["module"] == "relu"
    full = get_architecture("resnet50v2_sn").build().feature_info
    assert full.out_indices == (0, 1, 2, 3, 4) and full.module_name()[-1] == "sn_out"
    assert [stage["num_chs"] for stage in full] == expected_channels(50)


def test_features_only_drops_the_head_and_the_stages_after_the_last_index():
    model = snzoo.create_model("resnet18v1_sn", features_only=True, out_indices=(0, 2))
    keys = list(model.state_dict())
    assert keys[0] == "conv1.weight" and any(k.startswith("layer2.") for k in keys)
    assert not any(k.startswith(("layer3.", "layer4.", "fc.")) for k in keys)
    assert [m.shape[1] for m in model(torch.randn(1, 3, 64, 64))] == [64, 128]


# ---- features equal the full model's activations ----------------------------------------------------------------

def _hooked_activations(model: nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Stage outputs caught by forward hooks on the full model (stem ReLU's first call, layer1..layer4; for v2
    the ReLU's second call, after sn_out), and the logits."""
    relu_calls, layers = [], {}
    handles = [model.relu.register_forward_hook(lambda m, i, o: relu_calls.append(o.clone()))]
    names = [name for name, _ in model.named_children() if name.startswith("layer")]
    for name in names:
        handles.append(model.get_submodule(name).register_forward_hook(
            lambda m, i, o, name=name: layers.__setitem__(name, o.clone())))
    logits = model(x)
    for handle in handles:
        handle.remove()
    stages = [relu_calls[0]] + [layers[n] for n in names]
    if getattr(model, "version", 1) == 2 and len(names) == 4:
        assert len(relu_calls) == 2
        stages[-1] = relu_calls[1]
    return stages, logits


@pytest.mark.parametrize("name", ["resnet18v1_sn", "resnet50v2_sn", "resnet20_sn"])
def test_features_equal_the_full_models_activations(name, tmp_path):
    torch.manual_seed(0)
    full = randomise(get_architecture(name).build()).eval()
    checkpoint = save_checkpoint(full, tmp_path / "model.pth")
    cifar = name.startswith("resnet20")
    photos = photo_batch(64, 2)
    x = photos.mean(1, keepdim=True) if cifar else photos
    with torch.no_grad():
        expected, logits = _hooked_activations(full, x)
        features = snzoo.create_model(name, checkpoint_path=checkpoint, features_only=True).eval()(x)
        final, intermediates = full.forward_intermediates(x)
        assert torch.equal(full.forward_head(final), logits)
    assert len(features) == len(expected) == len(full.feature_info)
    for got, want, again in zip(features, expected, intermediates):
        assert torch.equal(got, want) and torch.equal(again, want)
    assert torch.equal(final, full.forward_features(x)) and torch.equal(final, expected[-1])


def test_forward_intermediates_indices_as_timm():
    model = randomise(get_architecture("resnet18v2_sn").build()).eval()
    x = photo_batch(64, 1)
    with torch.no_grad():
        final, every = model.forward_intermediates(x)
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        chosen = model.forward_intermediates(x, indices=[1, -1], intermediates_only=True)
        early_final, early = model.forward_intermediates(x, indices=[2], stop_early=True)
    assert len(every) == 5
    assert all(torch.equal(a, b) for a, b in zip(last_two, every[3:])) and len(last_two) == 2
    assert torch.equal(chosen[0], every[1]) and torch.equal(chosen[1], every[4])
    assert torch.equal(early_final, every[2]) and torch.equal(early[0], every[2])
    for bad in (6, [5], [-6]):
        with pytest.raises(ValueError, match="stage"):
            model.forward_intermediates(x, indices=bad)
    with pytest.raises(ValueError, match="NCHW"):
        model.forward_intermediates(x, output_fmt="NHWC")


# ---- output_stride ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["resnet50v1_sn", "resnet18v2_sn"])
def test_output_stride_keeps_keys_and_shapes_and_loads_the_same_weights(name, tmp_path):
    plain = randomise(get_architecture(name).build())
    checkpoint = save_checkpoint(plain, tmp_path / "model.pth")
    shapes = {k: tuple(v.shape) for k, v in plain.state_dict().items()}
    for output_stride in (16, 8):
        model = snzoo.create_model(name, checkpoint_path=checkpoint, output_stride=output_stride).eval()
        assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes
        assert all(torch.equal(v, plain.state_dict()[k]) for k, v in model.state_dict().items())
        with torch.no_grad():
            maps = model.forward_intermediates(photo_batch(64, 1), intermediates_only=True)
        assert [m.shape[-1] for m in maps] == [64 // r for r in REDUCTIONS[output_stride]]
        assert model.feature_info.reduction() == REDUCTIONS[output_stride]


def test_output_stride_dilates_as_torchvision():
    def conv(model, path):
        return model.get_submodule(path)

    os16 = get_architecture("resnet50v1_sn").build(output_stride=16)
    os8 = get_architecture("resnet50v1_sn").build(output_stride=8)
    # The first block of a dilated stage keeps the previous dilation, the others take the new one; no stride.
    assert (conv(os16, "layer3.0.conv2").stride, conv(os16, "layer4.0.conv2").stride) == ((2, 2), (1, 1))
    assert [conv(os16, f"layer4.{i}.conv2").dilation for i in range(3)] == [(1, 1), (2, 2), (2, 2)]
    assert conv(os16, "layer4.0.downsample.0").stride == (1, 1)
    assert [conv(os8, f"layer3.{i}.conv2").dilation for i in (0, 1)] == [(1, 1), (2, 2)]
    assert [conv(os8, f"layer4.{i}.conv2").dilation for i in (0, 1)] == [(2, 2), (4, 4)]
    assert [conv(os8, f"layer4.{i}.conv2").padding for i in (0, 1)] == [(2, 2), (4, 4)]
    basic = get_architecture("resnet18v1_sn").build(output_stride=8)
    assert (conv(basic, "layer4.0.conv1").dilation, conv(basic, "layer4.0.conv2").dilation) == ((2, 2), (4, 4))
    with pytest.raises(ValueError, match="output_stride"):
        get_architecture("resnet50v1_sn").build(output_stride=4)


# ---- in_chans from pretrained weights -----------------------------------------------------------------------------

def timm_rule(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """timm's adapt_input_conv written out: sum for one channel, else repeat and scale by I / in_chans."""
    if in_chans == 1:
        return weight.sum(1, keepdim=True)
    repeated = torch.cat([weight] * math.ceil(in_chans / weight.shape[1]), 1)[:, :in_chans]
    return repeated * (weight.shape[1] / in_chans)


def assert_adapted(model: nn.Module, reference: dict, in_chans: int) -> None:
    state = model.state_dict()
    assert state["conv1.weight"].shape[1] == in_chans
    assert torch.allclose(state["conv1.weight"], timm_rule(reference["conv1.weight"], in_chans), rtol=0, atol=1e-7)
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) for k in reference if k != "conv1.weight")


def test_fashion_mnist_weights_adapted_to_three_channels(tmp_path):
    native = snzoo.create_model("resnet20_sn", pretrained=True).eval()
    reference = native.state_dict()
    rgb = snzoo.create_model("resnet20_sn", pretrained=True, in_chans=3).eval()
    assert_adapted(rgb, reference, 3)
    assert torch.equal(rgb.conv1.weight, reference["conv1.weight"].repeat(1, 3, 1, 1) * (1 / 3))
    grey = photo_batch(28, 2).mean(1, keepdim=True)
    with torch.no_grad():
        # A grey image given as three equal channels gives what the native model gives for it.
        assert torch.allclose(rgb(grey.expand(-1, 3, -1, -1)), native(grey), atol=1e-4)
    # A model folder's weights take the same path.
    folder = export_hf("resnet20_sn", tmp_path / "folder")
    backbone = snzoo.create_model(f"local-dir:{folder}", pretrained=True, in_chans=4, features_only=True)
    assert_adapted(backbone, {k: v for k, v in reference.items() if not k.startswith("fc.")}, 4)


@pytest.mark.parametrize("in_chans", [1, 4, 7])
def test_imagenet_checkpoint_adapted_to_other_input_channels(in_chans, tmp_path):
    source = randomise(get_architecture("resnet18v1_sn").build())
    reference = source.state_dict()
    checkpoint = save_checkpoint(source, tmp_path / "model.pth")
    model = snzoo.create_model("resnet18v1_sn", checkpoint_path=checkpoint, in_chans=in_chans)
    assert_adapted(model, reference, in_chans)
    if in_chans == 1:
        assert torch.equal(model.conv1.weight, reference["conv1.weight"].sum(1, keepdim=True))
    if in_chans == 4:
        w = reference["conv1.weight"]
        assert torch.equal(model.conv1.weight, torch.cat([w, w[:, :1]], 1) * 0.75)
    features = snzoo.create_model("resnet18v1_sn", checkpoint_path=checkpoint, in_chans=in_chans,
                                  features_only=True, out_indices=(0,))
    assert features(torch.randn(1, in_chans, 32, 32))[0].shape == (1, 64, 16, 16)


def test_adapt_input_conv_keeps_dtype_and_refuses_other_shapes():
    w = torch.randn(8, 3, 3, 3, dtype=torch.float16)
    assert adapt_input_conv(w, 1).dtype == torch.float16
    assert torch.equal(adapt_input_conv(w, 3), w)
    with pytest.raises(ValueError, match="convolution weight"):
        adapt_input_conv(torch.randn(8, 3), 1)
    with pytest.raises(snzoo.SnzooError, match="shape mismatch"):
        # A different kernel is no input-channel change: the key / shape check still reports it.
        state = get_architecture("resnet20_sn").build().state_dict()
        state["conv1.weight"] = torch.randn(16, 3, 5, 5)
        from snzoo.models import build_model
        build_model("resnet20_sn", state_dict=state)


# ---- device / dtype and the meta device ---------------------------------------------------------------------------

LAYER_CLASSES = [SwitchNorm1d, SwitchNorm2d, SwitchNorm3d, SyncSwitchNorm2d, SparseSwitchNorm2d]


@pytest.mark.parametrize("cls", LAYER_CLASSES)
def test_sn_layers_take_device_and_dtype(cls):
    layer = cls(8, device="meta", dtype=torch.float64)
    for name, tensor in list(layer.named_parameters()) + list(layer.named_buffers()):
        assert tensor.is_meta, name
        assert tensor.dtype == (torch.long if name.endswith("_fixed") else torch.float64), name
    double = cls(8, dtype=torch.float64)
    single = cls(8)
    assert all(t.dtype == torch.float64 for n, t in double.state_dict().items() if not n.endswith("_fixed"))
    assert all(torch.equal(a.double(), b) for a, b in zip(single.state_dict().values(), double.state_dict().values()))
    shape = {SwitchNorm1d: (4, 8), SwitchNorm3d: (2, 8, 2, 3, 3)}.get(cls, (2, 8, 5, 5))
    x = torch.randn(shape, dtype=torch.float64)
    single.train(), double.train()
    if cls is SyncSwitchNorm2d:  # without torch.distributed it normalises as SwitchNorm2d
        single.process_group = double.process_group = None
    assert double(x).dtype == torch.float64
    assert torch.allclose(double(x), single(x.float()).double(), atol=1e-5)


@pytest.mark.parametrize("name", list_architectures())
def test_every_architecture_builds_on_the_meta_device(name):
    with torch.device("meta"):
        model = get_architecture(name).build()
        backbone = snzoo.create_model(name, features_only=True)
    assert all(t.is_meta for t in model.state_dict().values())
    assert all(t.is_meta for t in backbone.state_dict().values())
    assert backbone.feature_info.channels() == model.feature_info.channels()
