"""Checkpoints: the original release's format, bare state dicts and safetensors, read safely and checked."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import snzoo
from snzoo.weights import read_state_dict
from snzoo.errors import CheckpointError
from snzoo.nn import switchnorm_layers
from photos import photo_batch


def randomise_sn_state(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every SN layer non-trivial importance weights, affine parameters and running statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in switchnorm_layers(model):
            layer.mean_weight.copy_(torch.randn(layer.mean_weight.shape, generator=g))
            layer.var_weight.copy_(torch.randn(layer.var_weight.shape, generator=g))
            layer.weight.copy_(1 + 0.1 * torch.randn(layer.weight.shape, generator=g))
            layer.bias.copy_(0.1 * torch.randn(layer.bias.shape, generator=g))
            if layer.using_bn:
                layer.running_mean.copy_(0.1 * torch.randn(layer.running_mean.shape, generator=g))
                layer.running_var.copy_(0.5 + torch.rand(layer.running_var.shape, generator=g))


def save_original_format(model: torch.nn.Module, path, arch_name: str = "resnetv1sn50") -> None:
    """Write a checkpoint the way the original training scripts did (DataParallel keys, optimizer state)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    model.train()
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    optimizer.step()
    randomise_sn_state(model)
    torch.save(
        {
            "epoch": 100,
            "model": arch_name,
            "state_dict": {"module." + k: v for k, v in model.state_dict().items()},
            "best_prec1": np.float64(77.49),
            "optimizer": optimizer.state_dict(),
        },
        path,
    )


@pytest.fixture(scope="module")
def trained_sn50(tmp_path_factory):
    torch.manual_seed(0)
    model = snzoo.create_model("resnet50v1_sn")
    path = tmp_path_factory.mktemp("ckpt") / "ResNet50v1+SN(8,32)-77.49.pth"
    save_original_format(model, path)
    return model.eval(), path


def test_original_checkpoint_loads_and_gives_identical_outputs_on_photos(trained_sn50):
    model, path = trained_sn50
    loaded = snzoo.create_model("resnet50v1_sn", checkpoint_path=path).eval()
    photos = photo_batch(224, count=4)
    with torch.no_grad():
        expected, got = model(photos), loaded(photos)
    assert torch.equal(expected, got)
    # The equality says something only if the output depends on the image and on the weights that were read.
    assert (expected - expected.mean(0)).abs().max() > 1e-2
    torch.manual_seed(1)
    fresh = snzoo.create_model("resnet50v1_sn").eval()
    with torch.no_grad():
        assert (fresh(photos) - expected).abs().max() > 1e-2


def test_bare_state_dict_and_safetensors_load_the_same(trained_sn50, tmp_path):
    model, _ = trained_sn50
    bare = tmp_path / "bare.pth"
    torch.save(model.state_dict(), bare)
    st = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(st))
    reference = model.state_dict()
    for path in (bare, st):
        sd = read_state_dict(path)
        assert sd.keys() == reference.keys()
        assert all(torch.equal(sd[k], reference[k]) for k in sd)


def test_prefix_is_stripped_and_checkpoint_extras_ignored(trained_sn50):
    _, path = trained_sn50
    sd = read_state_dict(path)
    assert len(sd) == 373 and not any(k.startswith("module.") for k in sd)
    assert "layer1.0.sn3.mean_weight" in sd


def test_num_classes_change_reinitialises_only_the_classifier(trained_sn50):
    model, path = trained_sn50
    torch.manual_seed(1)
    tuned = snzoo.create_model("resnet50v1_sn", checkpoint_path=path, num_classes=10)
    assert tuned.fc.out_features == 10
    ref = model.state_dict()
    for key, value in tuned.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(value, ref[key]), key


def test_wrong_architecture_gives_a_readable_difference(trained_sn50):
    _, path = trained_sn50
    with pytest.raises(CheckpointError) as info:
        snzoo.create_model("resnet50v2_sn", checkpoint_path=path)
    message = str(info.value)
    assert "\n" not in message
    assert "does not match resnet50v2_sn" in message
    assert "missing keys" in message and "unexpected keys" in message and "downsample" in message


def test_class_count_mismatch_suggests_num_classes(trained_sn50, tmp_path):
    model, _ = trained_sn50
    sd = dict(model.state_dict())
    sd["fc.weight"], sd["fc.bias"] = sd["fc.weight"][:10], sd["fc.bias"][:10]
    path = tmp_path / "ten.pth"
    torch.save({"state_dict": sd}, path)
    with pytest.raises(CheckpointError, match=r"fc.weight: checkpoint 10x2048 vs model 1000x2048.*pass num_classes"):
        snzoo.create_model("resnet50v1_sn", checkpoint_path=path)
    loaded = snzoo.create_model("resnet50v1_sn", checkpoint_path=path, num_classes=10)
    assert torch.equal(loaded.fc.weight, sd["fc.weight"])  # same class count: the head is loaded, not reset


def test_using_bn_false_checkpoint_needs_using_bn_false(tmp_path):
    model = snzoo.create_model("resnet18v1_sn", using_bn=False, num_classes=5)
    path = tmp_path / "nobn.pth"
    torch.save(model.state_dict(), path)
    with pytest.raises(CheckpointError, match="using_bn=False"):
        snzoo.create_model("resnet18v1_sn", checkpoint_path=path, num_classes=5)
    loaded = snzoo.create_model("resnet18v1_sn", checkpoint_path=path, num_classes=5, using_bn=False)
    assert not loaded.sn1.using_bn


class _RunsCode:
    def __reduce__(self):
        return (os.mkdir, (os.environ["SNZOO_TEST_MARKER"],))


def test_pickle_that_carries_code_is_refused_without_running(tmp_path, monkeypatch):
    marker = tmp_path / "code-ran"
    monkeypatch.setenv("SNZOO_TEST_MARKER", str(marker))
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "payload": _RunsCode()}, path)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="refused"):
        read_state_dict(path)
    assert not marker.exists()


def test_truncated_and_garbage_files_fail_clearly(trained_sn50, tmp_path):
    _, path = trained_sn50
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[: 1 << 20])
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"<html>Google Drive - virus scan warning</html>")
    for bad in (truncated, garbage):
        with pytest.raises(CheckpointError, match="cannot be read as a PyTorch checkpoint"):
            read_state_dict(bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_state_dict(tmp_path / "absent.pth")


def test_non_state_dict_content_fails_clearly(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match="not a state dict"):
        read_state_dict(path)
    path = tmp_path / "meta.pth"
    torch.save({"epoch": 3, "arch": "x"}, path)
    with pytest.raises(CheckpointError, match="no state dict found"):
        read_state_dict(path)


def _resnet20_state(arch: str = "resnet20_sn") -> dict:
    torch.manual_seed(0)
    return snzoo.create_model(arch, num_classes=10).state_dict()


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused_naming_the_first_bad_tensor(tmp_path, bad_value):
    from snzoo.tools.weights import verify_file

    sd = _resnet20_state()
    sd["layer1.0.conv1.weight"][0, 0, 0, 0] = bad_value
    sd["layer2.0.sn1.running_var"].view(-1)[1] = bad_value
    path = tmp_path / "ckpt.pth"
    torch.save(sd, path)
    expected = rf"^{path}: tensor layer1.0.conv1.weight has non-finite values \(NaN/inf\); the checkpoint is corrupt$"
    with pytest.raises(CheckpointError, match=expected):
        snzoo.create_model("resnet20_sn", checkpoint_path=path)
    with pytest.raises(CheckpointError, match=expected):
        verify_file(path, "resnet20_sn")
    with pytest.raises(CheckpointError, match=expected):
        verify_file(path)  # without an architecture too
    # A non-finite classifier that a new head replaces is no reason to refuse the rest.
    sd = _resnet20_state()
    sd["fc.weight"][0, 0] = bad_value
    torch.save(sd, path)
    assert snzoo.create_model("resnet20_sn", checkpoint_path=path, num_classes=5).fc.out_features == 5


def test_integer_weights_are_refused_but_integer_buffers_and_half_precision_load(tmp_path):
    from snzoo.tools.weights import verify_file

    sd = _resnet20_state()
    ints = {k: v.long() if v.is_floating_point() else v for k, v in sd.items()}
    path = tmp_path / "ckpt.pth"
    torch.save(ints, path)
    first = next(iter(sd))
    expected = rf"^{path}: tensor {first} is int64 but the model holds it as floating point"
    with pytest.raises(CheckpointError, match=expected):
        snzoo.create_model("resnet20_sn", checkpoint_path=path)
    with pytest.raises(CheckpointError, match=expected):
        verify_file(path, "resnet20_sn")
    # BN's num_batches_tracked is int64 in the model itself; float16 weights are cast on loading as before.
    bn = _resnet20_state("resnet20_bn")
    assert any(not v.is_floating_point() for v in bn.values())
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in bn.items()}, path)
    model = snzoo.create_model("resnet20_bn", checkpoint_path=path)
    assert verify_file(path, "resnet20_bn")["ok"]
    assert torch.equal(model.state_dict()["fc.weight"], bn["fc.weight"].half().float())


def test_the_zoos_shipped_weights_pass_the_value_checks():
    from snzoo import zoo
    from snzoo.tools.weights import verify_file

    shipped = sorted((Path(snzoo.__file__).parent / "pretrained").glob("*.safetensors"))
    assert len(shipped) == 12
    for path in shipped:
        entry = zoo.get_entry(path.name.removesuffix(".safetensors"))
        assert verify_file(path, entry.architecture)["ok"]
    model = snzoo.create_model("resnet20_sn", pretrained=True)  # `make demo`'s entry, through the cache
    assert all(bool(torch.isfinite(v).all()) for v in model.state_dict().values() if v.is_floating_point())
