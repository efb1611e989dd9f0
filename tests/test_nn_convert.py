"""convert_to_switchnorm: torchvision / timm / GroupNorm / InstanceNorm models to SN, the preserve bound, uniform start."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from photos import photo_batch
from snzoo.nn import (
    PRESERVE_SHARE, SwitchNorm1d, SwitchNorm2d, SwitchNorm3d, SwitchNormAct2d, SyncSwitchNorm2d, convert_to_switchnorm,
    switchnorm_layers,
)
from snzoo.nn.functional import instance_stats, layer_stats


def _with_statistics(model: nn.Module, images: torch.Tensor) -> nn.Module:
    """Running statistics made non-trivial by train-mode forwards on real photographs, then eval."""
    model.train()
    with torch.no_grad():
        for flip in (False, True, False):
            model(images.flip(3) if flip else images)
    return model.eval()


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    return photo_batch(size=128, count=4)


@pytest.fixture(scope="module")
def resnet50(photos) -> nn.Module:
    torch.manual_seed(0)
    return _with_statistics(torchvision.models.resnet50(), photos)


def _bn_source_bound(layer: SwitchNorm2d, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the source BatchNorm's eval output, the preserve bound) for a converted layer at input x, in float64."""
    n, c = x.shape[:2]
    x3 = x.reshape(n, c, -1)
    mean_in, var_in = instance_stats(x3)
    mean_ln, var_ln = layer_stats(mean_in, var_in + mean_in * mean_in)
    mu, var = layer.running_mean.view(1, c, 1), layer.running_var.view(1, c, 1)
    gamma, beta = layer.weight.view(1, c, 1), layer.bias.view(1, c, 1)
    p, q = (w.detach() for w in layer.importance_weights())
    delta_m, delta_v = 1 - p[2], 1 - q[2]
    d_m = torch.maximum((mean_in - mu).abs(), (mean_ln - mu).abs())
    d_v = torch.maximum((var_in - var).abs(), (var_ln - var).abs())
    s2 = (1 - delta_v) * (var + layer.eps)
    bound = gamma.abs() * (delta_m * d_m / s2.sqrt() + (x3 - mu).abs() * delta_v * d_v / (2 * s2 ** 1.5))
    source = (x3 - mu) / (var + layer.eps).sqrt() * gamma + beta
    return source.reshape(x.shape), bound.reshape(x.shape)


def test_resnet50_preserve_reproduces_each_batchnorm_within_the_stated_bound(resnet50, photos):
    model = convert_to_switchnorm(copy.deepcopy(resnet50).double(), init="preserve")
    layers = switchnorm_layers(model)
    assert len(layers) == 53 and not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    inputs: dict[int, torch.Tensor] = {}
    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda m, args, i=i: inputs.__setitem__(i, args[0].detach()))
    with torch.no_grad():
        model(photos.double())
        worst_ratio, worst_bound = 0.0, 0.0
        for i, layer in enumerate(layers):
            delta = 1 - layer.importance_weights()[0][2]
            assert 0 < delta < PRESERVE_SHARE
            source, bound = _bn_source_bound(layer, inputs[i])
            measured = (layer(inputs[i]) - source).abs()
            assert (measured <= bound + 1e-12).all(), i
            worst_ratio = max(worst_ratio, float(measured.max() / bound.max()))
            worst_bound = max(worst_bound, float(bound.max() / source.abs().max()))
    assert worst_ratio > 0.1  # the bound is close to what happens, not a loose overestimate
    assert worst_bound < 1e-4  # and small against the layers' outputs


def test_resnet50_preserve_matches_the_source_model_on_photographs(resnet50, photos):
    model = convert_to_switchnorm(copy.deepcopy(resnet50), init="preserve").eval()
    with torch.no_grad():
        expected, got = resnet50(photos), model(photos)
    assert (got - expected).abs().max() < 1e-4 * expected.abs().max()
    assert torch.equal(got.argmax(1), expected.argmax(1))
    assert model.bn1.momentum == pytest.approx(0.9) and model.bn1.eps == resnet50.bn1.eps
    assert torch.equal(model.layer1[0].bn2.running_var.flatten(), resnet50.layer1[0].bn2.running_var)


def test_uniform_init_gives_equal_importance_weights_and_the_model_trains(resnet50, photos):
    model = convert_to_switchnorm(copy.deepcopy(resnet50), init="uniform").train()
    for layer in switchnorm_layers(model):
        for probs in layer.importance_weights():
            assert torch.equal(probs, torch.full((3,), 1 / 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loss = nn.functional.cross_entropy(model(photos), torch.tensor([1, 2, 3, 4]))
    loss.backward()
    assert torch.isfinite(loss)
    for layer in switchnorm_layers(model):
        assert layer.mean_weight.grad.abs().sum() > 0 and layer.var_weight.grad.abs().sum() > 0
    before = model.bn1.mean_weight.detach().clone()
    optimizer.step()
    assert not torch.equal(before, model.bn1.mean_weight)


def test_preserve_model_trains_with_gradients_on_importance_weights(resnet50, photos):
    model = convert_to_switchnorm(copy.deepcopy(resnet50)).train()
    loss = nn.functional.cross_entropy(model(photos), torch.tensor([1, 2, 3, 4]))
    loss.backward()
    assert torch.isfinite(loss)
    grads = [layer.mean_weight.grad for layer in switchnorm_layers(model)]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_timm_norm_act_layers_keep_their_activation_and_the_output(photos):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    source = _with_statistics(timm.create_model("efficientnet_b0", pretrained=False), photos)
    norm_act = type(source.bn1)
    model = convert_to_switchnorm(copy.deepcopy(source)).eval()
    assert not any(isinstance(m, (nn.BatchNorm2d, norm_act)) for m in model.modules())
    assert isinstance(model.bn1, SwitchNormAct2d) and isinstance(model.bn1.act, nn.SiLU)
    assert isinstance(model.bn2.act, nn.SiLU) and type(model.blocks[1][0].bn3.act) is type(source.blocks[1][0].bn3.act)
    with torch.no_grad():
        expected, got = source(photos), model(photos)
    assert (got - expected).abs().max() < 1e-4 * expected.abs().max()


@pytest.fixture(scope="module")
def feature_maps(photos) -> torch.Tensor:
    """Eight channels of real photograph features, (4, 8, 64, 64), float64."""
    conv = nn.Conv2d(3, 8, 3, padding=1, stride=2).double()
    with torch.no_grad():
        nn.init.normal_(conv.weight, generator=torch.Generator().manual_seed(0))
        return conv(photos.double()) + 0.5


def _affine(layer: nn.Module) -> nn.Module:
    with torch.no_grad():
        layer.weight.copy_(torch.linspace(0.5, 2.0, layer.weight.numel()))
        layer.bias.copy_(torch.linspace(-1.0, 1.0, layer.bias.numel()))
    return layer


@pytest.mark.parametrize("source, term", [
    (nn.GroupNorm(1, 8), "ln"), (nn.GroupNorm(8, 8), "in"), (nn.InstanceNorm2d(8, affine=True), "in"),
])
def test_groupnorm_and_instancenorm_sources_are_reproduced(feature_maps, source, term):
    source = _affine(source).double()
    share = 1e-9  # the other terms' share, small enough that their (running statistics 0) contribution vanishes
    layer = convert_to_switchnorm(copy.deepcopy(source), share=share).eval()
    assert isinstance(layer, SwitchNorm2d)
    assert layer.importance_weights()[0][layer.terms.index(term)] > 1 - share
    x = feature_maps
    with torch.no_grad():
        got, expected = layer(x), source(x)
        # The same normalisation with SN's unbiased IN variance: the match up to the preserve share.
        n, c, length = x.shape[0], x.shape[1], x[0, 0].numel()
        groups = 1 if term == "ln" else c
        xg = x.reshape(n, groups, -1)
        mean, second = xg.mean(2, keepdim=True), xg.pow(2).mean(2, keepdim=True)
        var_unbiased = second - mean ** 2 + (xg.var(2, keepdim=True) if term == "in" else
                                             x.reshape(n, c, -1).var(2).mean(1).view(n, 1, 1)) / length
        unbiased = ((xg - mean) / (var_unbiased + source.eps).sqrt()).reshape(x.shape)
        unbiased = unbiased * source.weight.view(1, c, 1, 1) + source.bias.view(1, c, 1, 1)
    assert (got - unbiased).abs().max() < 1e-6
    # Against the source itself: the variances differ by the factor L / (L - 1) at most.
    normalised = (expected - source.bias.view(1, c, 1, 1)) / source.weight.view(1, c, 1, 1)
    allowed = source.weight.abs().view(1, c, 1, 1) * normalised.abs() * (1 - ((length - 1) / length) ** 0.5) + 1e-5
    assert ((got - expected).abs() <= allowed).all()
    assert (got - expected).abs().max() > 1e-6  # the unbiased variance is really there


@pytest.mark.parametrize("groups, term", [(2, "ln"), (4, "in")])
def test_other_group_counts_take_the_nearer_term(groups, term):
    layer = convert_to_switchnorm(nn.GroupNorm(groups, 8))
    mean, var = layer.importance_weights()
    assert layer.terms[int(mean.argmax())] == term and layer.terms[int(var.argmax())] == term


def test_ranks_momentum_eps_and_existing_sn_layers():
    model = nn.Sequential(nn.BatchNorm1d(4, momentum=0.2), nn.BatchNorm3d(4, eps=1e-3), nn.SyncBatchNorm(4),
                          nn.InstanceNorm3d(4), SwitchNorm2d(4), nn.BatchNorm2d(4, momentum=None))
    kept = model[4]
    convert_to_switchnorm(model, init="uniform")
    assert type(model[0]) is SwitchNorm1d and model[0].momentum == pytest.approx(0.8)
    assert type(model[1]) is SwitchNorm3d and model[1].eps == 1e-3
    assert type(model[2]) is SyncSwitchNorm2d and type(model[3]) is SwitchNorm3d
    assert model[4] is kept and model[5].momentum == 0.9
    assert convert_to_switchnorm(nn.BatchNorm2d(4), momentum=0.997).momentum == 0.997
    frozen = torchvision.ops.FrozenBatchNorm2d(4)
    frozen.running_var.fill_(4.0)
    assert torch.equal(convert_to_switchnorm(frozen).running_var.flatten(), torch.full((4,), 4.0))


def test_bad_requests_are_refused():
    with pytest.raises(ValueError, match="init"):
        convert_to_switchnorm(nn.BatchNorm2d(4), init="zeros")
    with pytest.raises(ValueError, match="using_bn"):
        convert_to_switchnorm(nn.BatchNorm2d(4), using_bn=False)
    with pytest.raises(ValueError, match="running statistics"):
        convert_to_switchnorm(nn.BatchNorm2d(4, track_running_stats=False))
    assert convert_to_switchnorm(nn.GroupNorm(2, 4), using_bn=False).terms == ("in", "ln")
