"""Frozen SN layers, frozen statistics (norm_eval) and re-opened Sparse SN weights."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from photos import photo_batch
from sn_testing import randomise
from snzoo.nn import (
    FrozenSparseSwitchNorm2d, FrozenSwitchNorm2d, SparseSwitchNorm2d, SwitchNorm1d, SwitchNorm2d, freeze_switchnorm,
    reopen_sparse_switchnorm, set_norm_eval, switchnorm_layers,
)
from snzoo.nn.functional import switch_norm_reference
from snzoo.train.plan import TrainConfig
from snzoo.train._model import build_run_model


@pytest.fixture(scope="module")
def features() -> torch.Tensor:
    """Real photograph features (4, 8, 32, 32)."""
    conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
    with torch.no_grad():
        nn.init.normal_(conv.weight, generator=torch.Generator().manual_seed(1))
        return conv(photo_batch(size=64, count=4))


def _model() -> nn.Sequential:
    ssn = randomise(SparseSwitchNorm2d(8), seed=1, buffers=True)
    with torch.no_grad():  # every term in sparsemax's support, so that the weights have a gradient
        ssn.mean_weight.copy_(torch.tensor([0.3, 0.5, 0.2]))
        ssn.var_weight.copy_(torch.tensor([0.1, 0.3, 0.4]))
    return nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), randomise(SwitchNorm2d(8), buffers=True), nn.ReLU(), ssn)


def _buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_frozen_layers_compute_the_eval_formulation_in_train_mode_without_gradients_or_updates(features):
    model = _model()
    model[3].set_radius(0.3)
    expected = copy.deepcopy(model).eval()(features)
    freeze_switchnorm(model)
    assert type(model[1]) is FrozenSwitchNorm2d and type(model[3]) is FrozenSparseSwitchNorm2d
    assert [n for n, _ in model.named_parameters()] == ["0.weight", "0.bias"]
    model.train()
    assert not model[1].training and not model[3].training
    before = _buffers(model)
    out = model(features)
    out.square().mean().backward()
    assert torch.equal(out, expected)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model[0].weight.grad is not None and not model[1].weight.requires_grad
    # The eval formulation against the float64 reference.
    layer = model[1]
    x = model[0](features).detach().double()
    mean_probs, var_probs = (p.double() for p in layer.importance_weights())
    reference = switch_norm_reference(
        x, layer.weight.double(), layer.bias.double(), mean_probs, var_probs, layer.running_mean.double(),
        layer.running_var.double(), terms=layer.terms, training=False, momentum=layer.momentum, eps=layer.eps)
    assert torch.allclose(layer(x.float()).double(), reference, rtol=1e-4, atol=1e-5)


def test_frozen_state_dict_loads_both_ways():
    model = _model()
    frozen = freeze_switchnorm(copy.deepcopy(model))
    assert {k: v.shape for k, v in frozen.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert list(frozen.state_dict()) == list(model.state_dict())
    fresh = _model().requires_grad_(False)
    fresh.load_state_dict(frozen.state_dict())
    frozen_fresh = freeze_switchnorm(nn.Sequential(*[copy.deepcopy(m) for m in _model()]))
    frozen_fresh.load_state_dict(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value) and torch.equal(frozen_fresh.state_dict()[key], value)
    bare = freeze_switchnorm(SwitchNorm1d(5))
    assert type(bare).__name__ == "FrozenSwitchNorm1d" and not list(bare.parameters())


def test_norm_eval_keeps_statistics_while_importance_and_affine_train(features):
    model = _model()
    expected = copy.deepcopy(model).eval()(features)
    assert set_norm_eval(model, True) == 2
    model.train()
    assert model.training and not model[1].training
    before = _buffers(model)
    out = model(features)
    out.square().mean().backward()
    assert torch.equal(out, expected)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    for layer in switchnorm_layers(model):
        for p in (layer.weight, layer.bias, layer.mean_weight, layer.var_weight):
            assert p.grad is not None and p.grad.abs().sum() > 0
    set_norm_eval(model, False)
    model.train()
    assert model[1].training


def _fixed_ssn() -> SparseSwitchNorm2d:
    layer = randomise(SparseSwitchNorm2d(8), buffers=True)
    with torch.no_grad():
        layer.mean_weight.copy_(torch.tensor([0.0, 1.0, 0.0]))
        layer.var_weight.copy_(torch.tensor([0.0, 0.0, 1.0]))
    layer.mean_fixed.fill_(1)
    layer.var_fixed.fill_(1)
    layer.set_radius(1.0)
    return layer


def test_reopened_ssn_starts_from_the_same_selection_and_moves(features):
    layer = _fixed_ssn().train()
    fixed_out = layer(features)
    assert reopen_sparse_switchnorm(layer, margin=1e-3) == 1
    assert int(layer.mean_fixed) == 0 and int(layer.var_fixed) == 0 and float(layer.radius) == 0.0
    mean, var = layer.importance_weights()
    assert int(mean.argmax()) == 1 and int(var.argmax()) == 2 and mean.min() > 0
    out = layer(features)
    assert (out - fixed_out).abs().max() < 1e-2 * fixed_out.abs().max()
    optimizer = torch.optim.SGD([layer.mean_weight, layer.var_weight], lr=0.1)
    before = layer.importance_weights()[0].detach().clone()
    (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
    assert layer.mean_weight.grad.abs().sum() > 0
    optimizer.step()
    assert not torch.equal(layer.importance_weights()[0].detach(), before)


def test_finetune_model_preparation_reopens_fixed_ssn_layers(tmp_path):
    from safetensors.torch import save_file

    import snzoo

    source = snzoo.create_model("resnet50v1_ssn")
    fixed = source.layer1[0].sn1
    with torch.no_grad():
        fixed.mean_weight.copy_(torch.tensor([1.0, 0.0, 0.0]))
    fixed.mean_fixed.fill_(1)
    path = tmp_path / "ssn.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    recipe = {"batch": {"per_device": 2}, "dropout": 0.0}
    messages: list[str] = []
    for reopen in (False, True):
        cfg = TrainConfig(name="resnet50v1_ssn", recipe=recipe, data="", output=tmp_path, init=str(path),
                          reopen_ssn=reopen)
        model = build_run_model(cfg, 10, messages.append)
        assert int(model.layer1[0].sn1.mean_fixed) == (0 if reopen else 1)
    assert messages == ["--reopen-ssn: 1 Sparse SN layers had fixed one-hot importance weights; re-opened from the "
                        "same selection"]
