"""SwitchNorm1d / 2d / 3d against the independent NumPy reference (tests/reference_sn.py) and the original's facts."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from snzoo.nn import (
    SwitchNorm1d,
    SwitchNorm2d,
    SwitchNorm3d,
    batch_average_layers,
    finalize_batch_average,
    set_ghost_batch_size,
)

try:  # tests/ as a package or as a plain directory on sys.path
    from . import reference_sn as ref
    from .sn_testing import TOL32, TOL64, randomise as _randomise, terms_of as _terms, to_numpy as _np
except ImportError:
    import reference_sn as ref
    from sn_testing import TOL32, TOL64, randomise as _randomise, terms_of as _terms, to_numpy as _np


# ------------------------------------------------------------------------------------------------ helpers
def _ref_step(layer, x: torch.Tensor):
    """Reference output and new buffers for one forward of `layer` (its current state and mode) on x."""
    rm = _np(layer.running_mean) if layer.using_bn else None
    rv = _np(layer.running_var) if layer.using_bn else None
    if isinstance(layer, SwitchNorm1d) and x.dim() == 2:
        return ref.switch_norm_1d_flat(
            _np(x), _np(layer.weight), _np(layer.bias), _np(layer.mean_weight), _np(layer.var_weight), rm, rv,
            training=layer.training, momentum=layer.momentum, eps=layer.eps,
            using_moving_average=layer.using_moving_average, ghost_batch_size=layer.ghost_batch_size,
        )
    return ref.switch_norm(
        _np(x), _np(layer.weight), _np(layer.bias), _np(layer.mean_weight), _np(layer.var_weight), rm, rv,
        training=layer.training, momentum=layer.momentum, eps=layer.eps,
        using_moving_average=layer.using_moving_average, using_bn=layer.using_bn,
        ghost_batch_size=layer.ghost_batch_size, terms=_terms(layer),
    )


def _check_steps(layer, inputs, tol):
    """Forward every input through layer and the reference; compare outputs and buffers after each step."""
    for x in inputs:
        y_ref, rm_ref, rv_ref = _ref_step(layer, x)
        y = layer(x)
        assert y.dtype == x.dtype and y.shape == x.shape
        np.testing.assert_allclose(_np(y), y_ref, **tol)
        if layer.using_bn:
            np.testing.assert_allclose(_np(layer.running_mean), rm_ref, **tol)
            np.testing.assert_allclose(_np(layer.running_var), rv_ref, **tol)


def _inputs(shape, steps, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    # different scales and offsets per channel, so IN / LN / BN statistics all differ
    c = shape[1]
    scale = torch.linspace(0.5, 2.0, c, dtype=torch.float64).reshape((1, c) + (1,) * (len(shape) - 2))
    return [(torch.randn(shape, generator=g, dtype=torch.float64) * scale + 0.3 * i).to(dtype) for i in range(steps)]


# ------------------------------------------------------------------------------- names, shapes and init
def test_switchnorm2d_parameters_buffers_and_init():
    sn = SwitchNorm2d(8)
    assert [n for n, _ in sn.named_parameters()] == ["weight", "bias", "mean_weight", "var_weight"]
    assert [n for n, _ in sn.named_buffers()] == ["running_mean", "running_var"]
    assert list(sn.state_dict()) == ["weight", "bias", "mean_weight", "var_weight", "running_mean", "running_var"]
    assert "num_batches_tracked" not in sn.state_dict()
    assert sn.weight.shape == (1, 8, 1, 1) and sn.bias.shape == (1, 8, 1, 1)
    assert sn.mean_weight.shape == (3,) and sn.var_weight.shape == (3,)
    assert sn.running_mean.shape == (1, 8, 1) and sn.running_var.shape == (1, 8, 1)
    assert torch.equal(sn.weight, torch.ones(1, 8, 1, 1)) and torch.equal(sn.bias, torch.zeros(1, 8, 1, 1))
    assert torch.equal(sn.mean_weight, torch.ones(3)) and torch.equal(sn.var_weight, torch.ones(3))
    assert torch.equal(sn.running_mean, torch.zeros(1, 8, 1))
    assert torch.equal(sn.running_var, torch.zeros(1, 8, 1))  # zero, not one
    assert sn.eps == 1e-5 and sn.momentum == 0.9 and sn.using_moving_average and sn.using_bn
    assert all(p.dtype == torch.float32 for p in sn.state_dict().values())


def test_switchnorm2d_last_gamma_and_no_bn():
    sn = SwitchNorm2d(5, last_gamma=True)
    assert torch.equal(sn.weight, torch.zeros(1, 5, 1, 1))
    assert torch.equal(sn.bias, torch.zeros(1, 5, 1, 1))
    assert torch.equal(sn.mean_weight, torch.ones(3))

    nobn = SwitchNorm2d(5, using_bn=False)
    assert list(nobn.state_dict()) == ["weight", "bias", "mean_weight", "var_weight"]
    assert nobn.mean_weight.shape == (2,) and nobn.var_weight.shape == (2,)
    assert not hasattr(nobn, "running_mean") or nobn.running_mean is None
    assert len(list(nobn.buffers())) == 0


def test_switchnorm3d_and_1d_shapes():
    sn3 = SwitchNorm3d(4)
    assert list(sn3.state_dict()) == ["weight", "bias", "mean_weight", "var_weight", "running_mean", "running_var"]
    assert sn3.weight.shape == (1, 4, 1, 1, 1) and sn3.bias.shape == (1, 4, 1, 1, 1)
    assert sn3.running_mean.shape == (1, 4, 1) and sn3.running_var.shape == (1, 4, 1)
    assert sn3.mean_weight.shape == (3,) and sn3.momentum == 0.997
    assert torch.equal(sn3.running_var, torch.zeros(1, 4, 1))

    sn1 = SwitchNorm1d(6)
    assert list(sn1.state_dict()) == ["weight", "bias", "mean_weight", "var_weight", "running_mean", "running_var"]
    assert sn1.weight.shape == (1, 6) and sn1.bias.shape == (1, 6)
    assert sn1.running_mean.shape == (1, 6) and sn1.running_var.shape == (1, 6)
    assert sn1.mean_weight.shape == (2,) and sn1.var_weight.shape == (2,)
    assert sn1.momentum == 0.997
    assert torch.equal(sn1.weight, torch.ones(1, 6)) and torch.equal(sn1.running_var, torch.zeros(1, 6))


def test_state_dict_round_trip_gives_same_output():
    a = _randomise(SwitchNorm2d(3).double(), seed=3)
    x = _inputs((4, 3, 5, 5), 3, torch.float64)
    for xi in x:
        a(xi)
    b = SwitchNorm2d(3).double()
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    assert torch.equal(a(x[0]), b(x[0]))


# ------------------------------------------------------------------------------------- hand-computed case
@pytest.mark.parametrize("using_moving_average", [True, False])
def test_statistics_and_momentum_by_hand(using_moving_average):
    # x[0] = [0, 2], x[1] = [4, 6]: mean_in = [1, 5], unbiased var_in = [2, 2],
    # mean_bn = 3, var_bn = mean(var_in + mean_in^2) - 9 = 15 - 9 = 6 (biased var would be 5, unbiased 20/3).
    sn = SwitchNorm2d(1, momentum=0.75, using_moving_average=using_moving_average).double()
    x = torch.tensor([[[[0.0, 2.0]]], [[[4.0, 6.0]]]], dtype=torch.float64)
    with torch.no_grad():
        sn.mean_weight.copy_(torch.tensor([-1e4, -1e4, 0.0], dtype=torch.float64))  # BN only
        sn.var_weight.copy_(torch.tensor([-1e4, -1e4, 0.0], dtype=torch.float64))
    y = sn(x)
    expected = (x - 3.0) / (6.0 + 1e-5) ** 0.5
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    if using_moving_average:
        # momentum is the weight of the OLD value: 0.75 * 0 + 0.25 * batch
        assert sn.running_mean.item() == pytest.approx(0.75)
        assert sn.running_var.item() == pytest.approx(1.5)
        sn(x)
        assert sn.running_mean.item() == pytest.approx(0.75 * 0.75 + 0.25 * 3)
        assert sn.running_var.item() == pytest.approx(0.75 * 1.5 + 0.25 * 6)
    else:
        # batch-average accumulation: mean and E[x^2] = mean^2 + var
        assert sn.running_mean.item() == pytest.approx(3.0)
        assert sn.running_var.item() == pytest.approx(15.0)
        sn(x)
        assert sn.running_mean.item() == pytest.approx(6.0)
        assert sn.running_var.item() == pytest.approx(30.0)


def test_in_and_ln_terms_by_hand():
    # C = 2, one sample: channel 0 = [0, 2] (mean 1, var 2), channel 1 = [4, 8] (mean 6, var 8).
    # LN: mean 3.5, var = mean(2 + 1, 8 + 36) - 12.25 = 23.5 - 12.25 = 11.25
    x = torch.tensor([[[[0.0, 2.0]], [[4.0, 8.0]]]], dtype=torch.float64)
    sn = SwitchNorm2d(2, using_bn=False).double()
    with torch.no_grad():
        sn.mean_weight.copy_(torch.tensor([-1e4, 0.0], dtype=torch.float64))
        sn.var_weight.copy_(torch.tensor([-1e4, 0.0], dtype=torch.float64))
    torch.testing.assert_close(sn(x), (x - 3.5) / (11.25 + 1e-5) ** 0.5, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        sn.mean_weight.copy_(torch.tensor([0.0, -1e4], dtype=torch.float64))
        sn.var_weight.copy_(torch.tensor([0.0, -1e4], dtype=torch.float64))
    mean = torch.tensor([1.0, 6.0], dtype=torch.float64).reshape(1, 2, 1, 1)
    var = torch.tensor([2.0, 8.0], dtype=torch.float64).reshape(1, 2, 1, 1)
    torch.testing.assert_close(sn(x), (x - mean) / (var + 1e-5).sqrt(), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------- against the reference
LAYERS_2D3D = [
    (SwitchNorm2d, (6, 4, 5, 3)),
    (SwitchNorm2d, (3, 2, 7, 7)),
    (SwitchNorm3d, (4, 3, 2, 3, 4)),
]


@pytest.mark.parametrize("cls,shape", LAYERS_2D3D)
@pytest.mark.parametrize("using_moving_average", [True, False])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, TOL64), (torch.float32, TOL32)])
def test_train_then_eval_matches_reference(cls, shape, using_moving_average, dtype, tol):
    layer = _randomise(cls(shape[1], momentum=0.8, using_moving_average=using_moving_average), seed=1).to(dtype)
    xs = _inputs(shape, 4, dtype, seed=2)
    layer.train()
    _check_steps(layer, xs, tol)
    layer.eval()
    before = (layer.running_mean.clone(), layer.running_var.clone())
    _check_steps(layer, xs[:2], tol)
    assert torch.equal(layer.running_mean, before[0]) and torch.equal(layer.running_var, before[1])


@pytest.mark.parametrize("dtype,tol", [(torch.float64, TOL64), (torch.float32, TOL32)])
def test_eval_uses_running_stats_only_for_bn(dtype, tol):
    layer = _randomise(SwitchNorm2d(4), seed=4).to(dtype)
    with torch.no_grad():
        layer.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]).reshape(1, 4, 1))
        layer.running_var.copy_(torch.tensor([1.5, 0.5, 3.0, 1.0]).reshape(1, 4, 1))
    layer.eval()
    x = _inputs((3, 4, 4, 4), 1, dtype, seed=5)[0]
    _check_steps(layer, [x], tol)
    # IN and LN stay per-sample in eval: a sample's output does not depend on the rest of the batch
    torch.testing.assert_close(layer(x)[:1], layer(x[:1]), **dict(rtol=tol["rtol"] * 10, atol=tol["atol"] * 10))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, TOL64), (torch.float32, TOL32)])
def test_using_bn_false_matches_reference(dtype, tol):
    layer = _randomise(SwitchNorm2d(5, using_bn=False), seed=6).to(dtype)
    xs = _inputs((4, 5, 3, 3), 2, dtype, seed=7)
    layer.train()
    _check_steps(layer, xs, tol)
    layer.eval()
    _check_steps(layer, xs, tol)
    # (8,1) setting: a batch of one sample works in training
    layer.train()
    _check_steps(layer, [xs[0][:1]], tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, TOL64), (torch.float32, TOL32)])
@pytest.mark.parametrize("using_moving_average", [True, False])
def test_switchnorm1d_flat_matches_reference(dtype, tol, using_moving_average):
    layer = _randomise(SwitchNorm1d(7, momentum=0.9, using_moving_average=using_moving_average), seed=8).to(dtype)
    xs = _inputs((5, 7), 3, dtype, seed=9)
    _check_steps(layer, xs, tol)
    layer.eval()
    _check_steps(layer, xs[:1], tol)


def test_switchnorm1d_flat_uses_unbiased_variances():
    # BN only: var over N must be the unbiased one (divides by N - 1)
    layer = SwitchNorm1d(2, momentum=0.0).double()
    with torch.no_grad():
        layer.mean_weight.copy_(torch.tensor([-1e4, 0.0], dtype=torch.float64))
        layer.var_weight.copy_(torch.tensor([-1e4, 0.0], dtype=torch.float64))
    x = torch.tensor([[0.0, 1.0], [2.0, 5.0], [4.0, 9.0]], dtype=torch.float64)
    layer(x)
    torch.testing.assert_close(layer.running_mean, torch.tensor([[2.0, 5.0]], dtype=torch.float64))
    torch.testing.assert_close(layer.running_var, torch.tensor([[4.0, 16.0]], dtype=torch.float64))
    # LN only: unbiased var over C of one sample [0, 2] is 2
    with torch.no_grad():
        layer.mean_weight.copy_(torch.tensor([0.0, -1e4], dtype=torch.float64))
        layer.var_weight.copy_(torch.tensor([0.0, -1e4], dtype=torch.float64))
    y = layer(torch.tensor([[0.0, 2.0], [1.0, 1.0]], dtype=torch.float64))
    torch.testing.assert_close(y[0], torch.tensor([-1.0, 1.0], dtype=torch.float64) / (2 + 1e-5) ** 0.5)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, TOL64), (torch.float32, TOL32)])
@pytest.mark.parametrize("using_moving_average", [True, False])
def test_switchnorm1d_ncl_matches_reference(dtype, tol, using_moving_average):
    layer = _randomise(SwitchNorm1d(3, using_moving_average=using_moving_average), seed=10).to(dtype)
    xs = _inputs((4, 3, 6), 3, dtype, seed=11)
    _check_steps(layer, xs, tol)
    layer.eval()
    _check_steps(layer, xs[:1], tol)


# ----------------------------------------------------------------------------------------- single values
@pytest.mark.parametrize(
    "make,shape",
    [
        (lambda: SwitchNorm2d(3), (4, 3, 1, 1)),
        (lambda: SwitchNorm2d(3, using_bn=False), (4, 3, 1, 1)),
        (lambda: SwitchNorm3d(3), (4, 3, 1, 1, 1)),
        (lambda: SwitchNorm1d(3), (4, 3, 1)),
    ],
)
def test_single_spatial_value_is_finite_and_defined(make, shape):
    """H*W == 1: the unbiased IN variance is defined as 0 (the original gives NaN)."""
    layer = _randomise(make(), seed=12).double()
    xs = _inputs(shape, 2, torch.float64, seed=13)
    x = xs[0].clone().requires_grad_(True)
    y_ref, _, _ = _ref_step(layer, x)
    y = layer(x)
    assert torch.isfinite(y).all()
    np.testing.assert_allclose(_np(y), y_ref, **TOL64)
    y.pow(2).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())
    if layer.using_bn:
        assert torch.isfinite(layer.running_var).all()
        layer.eval()
        _check_steps(layer, xs[1:], TOL64)
    # and in float32
    layer32 = _randomise(make(), seed=12)
    _check_steps(layer32, [xs[0].float()], TOL32)


def test_single_sample_switchnorm1d_flat_is_finite():
    layer = _randomise(SwitchNorm1d(4), seed=14).double()
    x = torch.randn(1, 4, dtype=torch.float64)
    y = layer(x)
    assert torch.isfinite(y).all() and torch.isfinite(layer.running_var).all()
    _check_steps(layer, [x], TOL64)


# -------------------------------------------------------------------------------------------- gradcheck
def _gradcheck_layer(layer, x):
    names = ["weight", "bias", "mean_weight", "var_weight"]
    params = [getattr(layer, n).detach().clone().requires_grad_(True) for n in names]
    x = x.detach().clone().requires_grad_(True)

    def f(inp, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (inp,))

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "make,shape",
    [
        (lambda: SwitchNorm2d(3), (4, 3, 3, 2)),
        (lambda: SwitchNorm2d(3, using_bn=False), (2, 3, 2, 2)),
        (lambda: SwitchNorm1d(3), (5, 3)),
        (lambda: SwitchNorm1d(3), (3, 3, 4)),
    ],
)
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck(make, shape, training):
    layer = _randomise(make(), seed=15).double()
    xs = _inputs(shape, 3, torch.float64, seed=16)
    for x in xs[1:]:  # non-trivial running buffers for eval
        layer(x)
    layer.train(training)
    _gradcheck_layer(layer, xs[0])


def test_gradcheck_ghost_batches():
    layer = _randomise(SwitchNorm2d(2), seed=17).double()
    layer.ghost_batch_size = 2
    _gradcheck_layer(layer, _inputs((4, 2, 2, 3), 1, torch.float64, seed=18)[0])


# ------------------------------------------------------------------------------------------ ghost batches
@pytest.mark.parametrize(
    "make,shape,k",
    [
        (lambda ma: SwitchNorm2d(3, momentum=0.7, using_moving_average=ma), (8, 3, 3, 3), 2),
        (lambda ma: SwitchNorm2d(3, momentum=0.7, using_moving_average=ma), (8, 3, 3, 3), 4),
        (lambda ma: SwitchNorm3d(2, momentum=0.7, using_moving_average=ma), (6, 2, 2, 2, 2), 3),
        (lambda ma: SwitchNorm1d(4, momentum=0.7, using_moving_average=ma), (6, 4), 2),
        (lambda ma: SwitchNorm1d(4, momentum=0.7, using_moving_average=ma), (6, 4, 3), 3),
    ],
)
@pytest.mark.parametrize("using_moving_average", [True, False])
def test_ghost_batches_equal_separate_devices(make, shape, k, using_moving_average):
    layer = _randomise(make(using_moving_average), seed=19).double()
    devices = [copy.deepcopy(layer) for _ in range(shape[0] // k)]
    assert set_ghost_batch_size(layer, k) == 1 and layer.ghost_batch_size == k
    for x in _inputs(shape, 3, torch.float64, seed=20):
        y_ref, rm_ref, rv_ref = _ref_step(layer, x)
        y = layer(x)
        y_dev = torch.cat([d(chunk) for d, chunk in zip(devices, x.split(k))])
        torch.testing.assert_close(y, y_dev, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(_np(y), y_ref, **TOL64)
        mean_dev = torch.stack([d.running_mean for d in devices]).mean(0)
        var_dev = torch.stack([d.running_var for d in devices]).mean(0)
        torch.testing.assert_close(layer.running_mean, mean_dev, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(layer.running_var, var_dev, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(_np(layer.running_mean), rm_ref, **TOL64)
        np.testing.assert_allclose(_np(layer.running_var), rv_ref, **TOL64)
    # ghost batches differ from whole-batch statistics (else this test could not tell them apart)
    whole = copy.deepcopy(layer)
    set_ghost_batch_size(whole, None)
    assert not torch.allclose(whole(x), layer(x))


def test_ghost_batch_size_at_least_batch_is_whole_batch():
    a = _randomise(SwitchNorm2d(3), seed=21).double()
    b = copy.deepcopy(a)
    set_ghost_batch_size(b, 8)
    x = _inputs((4, 3, 2, 2), 1, torch.float64, seed=22)[0]
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    torch.testing.assert_close(a.running_var, b.running_var, rtol=0, atol=0)


@pytest.mark.parametrize(
    "layer,shape",
    [(SwitchNorm2d(3), (6, 3, 2, 2)), (SwitchNorm1d(3), (6, 3)), (SwitchNorm1d(3), (6, 3, 2)), (SwitchNorm3d(3), (6, 3, 1, 2, 2))],
)
def test_ghost_batch_not_dividing_raises(layer, shape):
    set_ghost_batch_size(layer, 4)
    before = layer.running_mean.clone()
    with pytest.raises(ValueError, match=r"6 samples.*ghost batches of 4"):
        layer(torch.randn(shape))
    assert torch.equal(layer.running_mean, before)
    layer.eval()  # eval does not use batch statistics: any batch size works
    assert layer(torch.randn(shape)).shape == shape


def test_set_ghost_batch_size_on_model():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), SwitchNorm2d(4), nn.ReLU(), SwitchNorm2d(4, using_bn=False))
    assert set_ghost_batch_size(model, 2) == 2
    assert model[1].ghost_batch_size == 2 and model[3].ghost_batch_size == 2
    with pytest.raises(ValueError):
        set_ghost_batch_size(model, 0)
    assert set_ghost_batch_size(model, None) == 2 and model[1].ghost_batch_size is None


# ------------------------------------------------------------------------------------ batch-average helper
def _sn_ref_train_output(layer, x_np):
    y, _, _ = ref.switch_norm(
        x_np, _np(layer.weight), _np(layer.bias), _np(layer.mean_weight), _np(layer.var_weight),
        _np(layer.running_mean), _np(layer.running_var), training=True, eps=layer.eps,
    )
    return y


def _sn_ref_eval_output(layer, x_np):
    y, _, _ = ref.switch_norm(
        x_np, _np(layer.weight), _np(layer.bias), _np(layer.mean_weight), _np(layer.var_weight),
        _np(layer.running_mean), _np(layer.running_var), training=False, eps=layer.eps,
    )
    return y


def test_finalize_batch_average_matches_reference():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        SwitchNorm2d(4, using_moving_average=False),
        nn.ReLU(),
        nn.Conv2d(4, 5, 1),
        SwitchNorm2d(5),  # moving average: must stay untouched
        nn.ReLU(),
        nn.Conv2d(5, 3, 1),
        SwitchNorm2d(3, using_moving_average=False),
    ).double()
    for i in (1, 4, 7):
        _randomise(model[i], seed=30 + i)
    ba1, ma, ba2 = model[1], model[4], model[7]
    assert batch_average_layers(model) == [ba1, ba2]
    # history: some training steps (buffers of batch-average layers hold sums, i.e. garbage for eval)
    g = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(2):
        model(torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64))
    ma_before = (ma.running_mean.clone(), ma.running_var.clone())
    assert ba1.running_var.abs().sum() > 0
    # mixed modes that must come back afterwards
    model.train()
    model[3].eval()
    modes_before = {name: m.training for name, m in model.named_modules()}

    batches = [(torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64), torch.zeros(4)) for _ in range(4)]
    used = finalize_batch_average(model, batches, iterations=3)
    assert used == 3
    assert {name: m.training for name, m in model.named_modules()} == modes_before
    assert torch.equal(ma.running_mean, ma_before[0]) and torch.equal(ma.running_var, ma_before[1])

    # reference: the inputs of each SN layer, ba layers in train mode, the ma layer in eval mode
    inputs1, inputs2 = [], []
    with torch.no_grad():
        for x, _ in batches[:3]:
            h1 = model[0](x).numpy()
            inputs1.append(h1)
            h = np.maximum(_sn_ref_train_output(ba1, h1), 0)
            h = model[3](torch.from_numpy(h)).numpy()
            h = np.maximum(_sn_ref_eval_output(ma, h), 0)
            inputs2.append(model[6](torch.from_numpy(h)).numpy())
    for layer, inputs in ((ba1, inputs1), (ba2, inputs2)):
        mean_ref, var_ref = ref.batch_average_stats(inputs)
        np.testing.assert_allclose(_np(layer.running_mean), mean_ref, **TOL64)
        np.testing.assert_allclose(_np(layer.running_var), var_ref, **TOL64)
        assert (layer.running_var > 0).all()

    # bare tensors (no labels) work as batches too, and give the same result
    finalize_batch_average(model, [b[0] for b in batches[:3]])
    np.testing.assert_allclose(_np(ba2.running_var), ref.batch_average_stats(inputs2)[1], **TOL64)


def test_finalize_batch_average_arithmetic():
    # the reference arithmetic itself: two batches, known sums
    mean, var = ref.finalize_batch_average(np.array([2.0, 4.0]), np.array([10.0, 20.0]), 2)
    np.testing.assert_allclose(mean, [1.0, 2.0])
    np.testing.assert_allclose(var, [4.0, 6.0])


def test_finalize_batch_average_edge_cases():
    model = nn.Sequential(nn.Conv2d(3, 2, 1), SwitchNorm2d(2))
    assert finalize_batch_average(model, [torch.randn(2, 3, 4, 4)]) == 0  # nothing to do
    model = nn.Sequential(nn.Conv2d(3, 2, 1), SwitchNorm2d(2, using_moving_average=False))
    model.train()
    with pytest.raises(ValueError, match="empty"):
        finalize_batch_average(model, [])
    assert model.training and model[1].training


# --------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "layer,shape",
    [
        (SwitchNorm2d(3), (2, 3, 4)),
        (SwitchNorm2d(3), (2, 3, 4, 4, 4)),
        (SwitchNorm2d(3), (2, 4, 4, 4)),
        (SwitchNorm3d(3), (2, 3, 4, 4)),
        (SwitchNorm3d(3), (2, 2, 4, 4, 4)),
        (SwitchNorm1d(3), (2, 3, 4, 4)),
        (SwitchNorm1d(3), (2, 5)),
        (SwitchNorm1d(3), (2, 5, 4)),
    ],
)
def test_bad_input_raises(layer, shape):
    with pytest.raises(ValueError, match=type(layer).__name__):
        layer(torch.randn(shape))


def test_ghost_batches_and_synchronised_statistics_exclude_each_other():
    from snzoo.nn import convert_sync_switchnorm, set_ghost_batch_size

    model = nn.Sequential(nn.Conv2d(3, 4, 1), SwitchNorm2d(4))
    convert_sync_switchnorm(model)
    with pytest.raises(ValueError, match="exclude each other"):
        set_ghost_batch_size(model, 2)
    model[1].ghost_batch_size = 2  # set behind the helpers' back: the forward refuses
    with pytest.raises(ValueError, match="exclude each other"):
        model(torch.randn(4, 3, 5, 5))


def test_ghost_batchnorm_baseline_equals_separate_devices():
    import copy

    from snzoo.nn import set_ghost_batch_size
    from snzoo.nn.ghost_batchnorm import GhostBatchNorm2d

    torch.manual_seed(0)
    bn = GhostBatchNorm2d(4)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    x = torch.randn(8, 4, 5, 5) * 3 + 1
    devices = [copy.deepcopy(bn) for _ in range(4)]
    assert set_ghost_batch_size(nn.Sequential(bn), 2) == 1
    y = bn(x)
    assert torch.allclose(y, torch.cat([d(x[2 * i:2 * i + 2]) for i, d in enumerate(devices)]), atol=1e-6)
    assert torch.allclose(bn.running_mean, torch.stack([d.running_mean for d in devices]).mean(0), atol=1e-6)
    assert torch.allclose(bn.running_var, torch.stack([d.running_var for d in devices]).mean(0), atol=1e-6)
    y.sum().backward()  # gradients flow to the shared affine parameters
    assert bn.weight.grad is not None and bn.weight.grad.shape == (4,)
    bn.eval()
    assert torch.equal(bn(x), nn.functional.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps))
