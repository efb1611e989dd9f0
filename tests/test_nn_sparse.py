"""sparsemax, sparsestmax and SparseSwitchNorm2d against the NumPy reference and the SSN facts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from snzoo.nn import SparseSwitchNorm2d, set_sparsestmax_radius, sparsemax, sparsestmax

try:  # tests/ as a package or as a plain directory on sys.path
    from . import reference_sn as ref
except ImportError:
    import reference_sn as ref


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy().copy()


def _t(values, dtype=torch.float64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def _random_vectors(count, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        n = int(rng.integers(2, 7))
        scale = [0.1, 0.5, 1.0, 3.0][i % 4]
        out.append(rng.normal(size=n) * scale)
    return out


# -------------------------------------------------------------------------------------------- sparsemax
@pytest.mark.parametrize(
    "v,expected",
    [
        ([1.0, 1.0, 1.0], [1 / 3, 1 / 3, 1 / 3]),
        ([0.0, 0.5], [0.25, 0.75]),
        ([3.0, 1.0, 0.0], [1.0, 0.0, 0.0]),
        ([0.1, 0.6, -2.0], [0.25, 0.75, 0.0]),
        ([0.2, 0.5, 0.3], [0.2, 0.5, 0.3]),  # already on the simplex
        ([5.0, 5.0, 5.0, 5.0], [0.25] * 4),  # shift invariance
    ],
)
def test_sparsemax_known_values(v, expected):
    np.testing.assert_allclose(_np(sparsemax(_t(v))), expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ref.sparsemax(v), expected, rtol=1e-12, atol=1e-12)


def test_sparsemax_is_the_simplex_projection():
    rng = np.random.default_rng(1)
    for v in _random_vectors(200, seed=2):
        w = _np(sparsemax(_t(v)))
        assert w.min() >= 0 and abs(w.sum() - 1) < 1e-12
        np.testing.assert_allclose(w, ref.sparsemax(v), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(w, ref.simplex_projection_bisection(v), rtol=1e-9, atol=1e-9)
        # projection property: no point of the simplex is closer to v
        q = rng.dirichlet(np.ones(len(v)), size=64)
        assert np.linalg.norm(v - w) <= np.linalg.norm(v - q, axis=1).min() + 1e-12
        # float32 as well
        w32 = sparsemax(_t(v, torch.float32))
        assert w32.dtype == torch.float32
        np.testing.assert_allclose(_np(w32), w, atol=1e-5)


def test_sparsemax_gradcheck():
    for v in ([0.2, 0.5, 0.3], [0.1, 0.6, -2.0], [1.0, 0.2, 0.5, 0.45]):
        x = _t(v).requires_grad_(True)
        assert torch.autograd.gradcheck(sparsemax, (x,))


# ------------------------------------------------------------------------------------------ sparsestmax
def test_sparsestmax_known_values():
    # w = [0.25, 0.75] is 0.25*sqrt(2) from the centre: r = 0.5 pushes it to distance 0.5
    a = 0.5 / math.sqrt(2)
    np.testing.assert_allclose(_np(sparsestmax(_t([0.0, 0.5]), 0.5)), [0.5 - a, 0.5 + a], atol=1e-12)
    # r small: returned as sparsemax
    np.testing.assert_allclose(_np(sparsestmax(_t([0.0, 0.5]), 0.2)), [0.25, 0.75], atol=1e-12)
    # r = 0.8 leaves the simplex: recursion ends one-hot
    np.testing.assert_array_equal(_np(sparsestmax(_t([0.0, 0.5]), 0.8)), [0.0, 1.0])
    # recursion to an edge: w = [.5, .4, .1], r = 0.5 -> p < 0 -> edge {0, 1} with r_eff = sqrt(1/4 - 1/6)
    b = math.sqrt(1 / 24)
    expected = [0.5 + b, 0.5 - b, 0.0]
    np.testing.assert_allclose(ref.sparsestmax([0.5, 0.4, 0.1], 0.5), expected, atol=1e-12)
    np.testing.assert_allclose(_np(sparsestmax(_t([0.5, 0.4, 0.1]), 0.5)), expected, atol=1e-12)
    # radius 0 is sparsemax
    np.testing.assert_allclose(_np(sparsestmax(_t([0.5, 0.4, 0.1]), 0.0)), [0.5, 0.4, 0.1], atol=1e-12)


def test_sparsestmax_at_centre_is_unchanged():
    for dtype in (torch.float32, torch.float64):
        for v in ([1.0, 1.0, 1.0], [0.0, 0.0], [2.0, 2.0, 2.0, 2.0]):
            w = sparsestmax(_t(v, dtype), 0.5)
            assert torch.isfinite(w).all()
            np.testing.assert_allclose(_np(w), np.full(len(v), 1 / len(v)), atol=1e-6)
    # at the centre of a face (support of 2 out of 3)
    w = sparsestmax(_t([1.0, 1.0, -5.0]), 0.3)
    np.testing.assert_allclose(_np(w), [0.5, 0.5, 0.0], atol=1e-12)


def test_sparsestmax_matches_reference_on_random_vectors():
    radii = [0.0, 0.05, 0.2, 0.4, 0.6, 0.8, 0.95, 1.0]
    recursions = non_one_hot_recursions = 0
    for i, v in enumerate(_random_vectors(150, seed=3)):
        for r in radii:
            trace = []
            expected = ref.sparsestmax(v, r, trace=trace)
            got = sparsestmax(_t(v), r)
            np.testing.assert_allclose(_np(got), expected, rtol=1e-9, atol=1e-9, err_msg=f"v={v}, r={r}")
            assert abs(_np(got).sum() - 1) < 1e-9 and _np(got).min() >= 0
            if len(trace) > 1:
                recursions += 1
                if expected.max() < 1:
                    non_one_hot_recursions += 1
            got32 = sparsestmax(_t(v, torch.float32), r)
            np.testing.assert_allclose(_np(got32), expected, atol=2e-4, err_msg=f"float32 v={v}, r={r}")
    # the sample exercises the recursion, including recursions that end on a face (not a vertex)
    assert recursions > 50 and non_one_hot_recursions > 10


def test_sparsestmax_distance_from_centre():
    """Where the result is not a vertex and no recursion happened, it lies exactly at distance r."""
    pushed = 0
    for v in _random_vectors(60, seed=4):
        r = 0.3
        trace = []
        expected = ref.sparsestmax(v, r, trace=trace)
        w = _np(sparsestmax(_t(v), r))
        support = ref.sparsemax(v) > 0
        u = support / support.sum()
        if len(trace) == 1 and w.max() < 1 and np.linalg.norm(ref.sparsemax(v) - u) < r:
            assert abs(np.linalg.norm(w - u) - r) < 1e-9
            assert np.array_equal(w > 0, support)  # stays on the face of its support
            pushed += 1
        np.testing.assert_allclose(w, expected, atol=1e-9)
    assert pushed >= 5


@pytest.mark.parametrize(
    "v,r",
    [
        ([0.2, 0.5, 0.3], 0.1),  # returns sparsemax
        ([0.2, 0.5, 0.3], 0.3),  # pushed to the sphere
        ([0.5, 0.4, 0.1], 0.5),  # recursion onto an edge
        ([0.1, 0.6, -2.0, 0.3], 0.35),
    ],
)
def test_sparsestmax_gradients_known_cases(v, r):
    x = _t(v).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: sparsestmax(t, r), (x,))


def test_sparsestmax_gradients_random():
    rng = np.random.default_rng(5)
    checked = 0
    for v in _random_vectors(30, seed=6):
        r = float(rng.uniform(0.0, 0.9))
        if ref.sparsestmax(v, r).max() == 1.0:
            continue
        x = _t(v).requires_grad_(True)
        assert torch.autograd.gradcheck(lambda t: sparsestmax(t, r), (x,), atol=1e-6, rtol=1e-5)
        checked += 1
    assert checked >= 10


def test_sparsestmax_gradient_is_not_zero_on_the_sphere():
    x = _t([0.2, 0.5, 0.3]).requires_grad_(True)
    y = sparsestmax(x, 0.3)
    (y * _t([1.0, -2.0, 0.5])).sum().backward()
    assert x.grad.abs().sum() > 1e-3


# ---------------------------------------------------------------------------------- SparseSwitchNorm2d
def _randomise(layer, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.copy_(1 + torch.randn(layer.weight.shape, generator=g))
        layer.bias.copy_(torch.randn(layer.bias.shape, generator=g))
        layer.mean_weight.copy_(torch.tensor([0.6, 0.3, 0.5]))
        layer.var_weight.copy_(torch.tensor([0.1, 0.4, 0.2]))
    return layer


def _ref_ssn(layer, x, mean_probs, var_probs):
    return ref.switch_norm(
        _np(x), _np(layer.weight), _np(layer.bias), None, None, _np(layer.running_mean), _np(layer.running_var),
        training=layer.training, momentum=layer.momentum, eps=layer.eps,
        using_moving_average=layer.using_moving_average, mean_probs=mean_probs, var_probs=var_probs,
    )


def test_ssn_state_dict():
    layer = SparseSwitchNorm2d(4)
    sd = layer.state_dict()
    assert list(sd)[:6] == ["weight", "bias", "mean_weight", "var_weight", "running_mean", "running_var"]
    assert set(sd) == {
        "weight", "bias", "mean_weight", "var_weight", "running_mean", "running_var", "mean_fixed", "var_fixed", "radius",
    }
    assert len(sd) == 9
    assert sd["mean_fixed"].dtype == torch.long and sd["mean_fixed"].shape == (1,) and sd["mean_fixed"].item() == 0
    assert sd["var_fixed"].dtype == torch.long and sd["var_fixed"].shape == (1,) and sd["var_fixed"].item() == 0
    assert sd["radius"].dtype == torch.float32 and sd["radius"].shape == (1,)
    assert sd["mean_weight"].shape == (3,) and sd["weight"].shape == (1, 4, 1, 1)
    assert sd["running_mean"].shape == (1, 4, 1) and torch.equal(sd["running_var"], torch.zeros(1, 4, 1))
    assert layer.momentum == 0.997
    assert torch.equal(SparseSwitchNorm2d(4, last_gamma=True).weight, torch.zeros(1, 4, 1, 1))


@pytest.mark.parametrize("radius", [0.0, 0.2, 0.45])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_ssn_matches_reference(radius, dtype, tol):
    layer = _randomise(SparseSwitchNorm2d(3, momentum=0.8), seed=1).to(dtype)
    set_sparsestmax_radius(layer, radius)
    mp = ref.sparsestmax(_np(layer.mean_weight), radius)
    vp = ref.sparsestmax(_np(layer.var_weight), radius)
    assert mp.max() < 1 and vp.max() < 1  # a real mix
    g = torch.Generator().manual_seed(2)
    for step in range(3):
        x = (torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64) + step).to(dtype)
        y_ref, rm_ref, rv_ref = _ref_ssn(layer, x, mp, vp)
        y = layer(x)
        np.testing.assert_allclose(_np(y), y_ref, rtol=tol, atol=tol)
        np.testing.assert_allclose(_np(layer.running_mean), rm_ref, rtol=tol, atol=tol)
        np.testing.assert_allclose(_np(layer.running_var), rv_ref, rtol=tol, atol=tol)
    layer.eval()
    y_ref, _, _ = _ref_ssn(layer, x, mp, vp)
    np.testing.assert_allclose(_np(layer(x)), y_ref, rtol=tol, atol=tol)
    if radius == 0.0:
        mean_probs, _ = layer.importance_weights()
        np.testing.assert_allclose(_np(mean_probs), ref.sparsemax(_np(layer.mean_weight)), atol=1e-6)
    assert layer.mean_fixed.item() == 0 and layer.var_fixed.item() == 0


def test_ssn_becomes_one_hot_and_freezes():
    layer = _randomise(SparseSwitchNorm2d(3), seed=3).double()
    with torch.no_grad():
        layer.mean_weight.copy_(_t([0.1, 0.5, 0.2]))  # sparsemax ~[0.17, 0.57, 0.27]: one-hot after recursion at r = 0.9
        layer.var_weight.copy_(_t([0.3, 0.3, 0.3]))  # at the centre: stays uniform at any radius
    layer.set_radius(0.9)
    assert ref.sparsestmax(_np(layer.mean_weight), 0.9).tolist() == [0.0, 1.0, 0.0]
    vp = ref.sparsestmax(_np(layer.var_weight), 0.9)
    assert vp.max() < 1  # var weights stay a mix at this radius
    x = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    y_ref, _, _ = _ref_ssn(layer, x, [0.0, 1.0, 0.0], vp)
    y = layer(x)
    np.testing.assert_allclose(_np(y), y_ref, atol=1e-10)
    assert layer.mean_fixed.item() == 1 and layer.var_fixed.item() == 0
    assert layer.mean_weight.tolist() == [0.0, 1.0, 0.0]
    y.pow(2).sum().backward()  # the in-place overwrite does not break this step's backward
    assert layer.var_weight.grad is not None

    # from now on the raw parameter is used as it is and gets no gradient
    layer.zero_grad(set_to_none=True)
    layer.set_radius(0.0)  # the radius no longer matters for the fixed vector
    y_ref, _, _ = _ref_ssn(layer, x, [0.0, 1.0, 0.0], ref.sparsemax(_np(layer.var_weight)))
    y = layer(x)
    np.testing.assert_allclose(_np(y), y_ref, atol=1e-10)
    y.pow(2).sum().backward()
    assert layer.mean_weight.grad is None or torch.count_nonzero(layer.mean_weight.grad) == 0
    assert layer.var_weight.grad is not None and layer.var_weight.grad.abs().sum() > 0
    assert layer.weight.grad is not None

    # the flags survive a state_dict round trip
    other = SparseSwitchNorm2d(3).double()
    other.load_state_dict(layer.state_dict())
    assert other.mean_fixed.item() == 1
    other.eval(), layer.eval()
    torch.testing.assert_close(other(x), layer(x))


def test_ssn_one_hot_by_sparsemax_alone():
    layer = SparseSwitchNorm2d(2)
    with torch.no_grad():
        layer.var_weight.copy_(torch.tensor([0.0, 3.0, 0.5]))
    layer(torch.randn(2, 2, 3, 3))
    assert layer.var_fixed.item() == 1 and layer.mean_fixed.item() == 0
    assert layer.var_weight.tolist() == [0.0, 1.0, 0.0]
    assert layer.mean_weight.tolist() == [1.0, 1.0, 1.0]  # the other vector is untouched


def test_ssn_eval_uses_radius_and_does_not_fix():
    layer = _randomise(SparseSwitchNorm2d(3), seed=4).double()
    g = torch.Generator().manual_seed(5)
    for _ in range(2):
        layer(torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64))
    layer.eval()
    x = torch.randn(2, 3, 3, 3, generator=g, dtype=torch.float64)
    layer.set_radius(0.3)
    mp, vp = ref.sparsestmax(_np(layer.mean_weight), 0.3), ref.sparsestmax(_np(layer.var_weight), 0.3)
    assert not np.allclose(mp, ref.sparsemax(_np(layer.mean_weight)))  # the radius matters here
    y_ref, _, _ = _ref_ssn(layer, x, mp, vp)
    np.testing.assert_allclose(_np(layer(x)), y_ref, atol=1e-10)
    # a radius that makes both one-hot: used in eval, but no flag flips and the raw values stay
    raw_before = (layer.mean_weight.clone(), layer.var_weight.clone())
    layer.set_radius(0.99)
    mp, vp = ref.sparsestmax(_np(layer.mean_weight), 0.99), ref.sparsestmax(_np(layer.var_weight), 0.99)
    assert mp.max() == 1 and vp.max() == 1
    y_ref, _, _ = _ref_ssn(layer, x, mp, vp)
    np.testing.assert_allclose(_np(layer(x)), y_ref, atol=1e-10)
    assert layer.mean_fixed.item() == 0 and layer.var_fixed.item() == 0
    assert torch.equal(layer.mean_weight, raw_before[0]) and torch.equal(layer.var_weight, raw_before[1])


def test_set_sparsestmax_radius_on_model():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), SparseSwitchNorm2d(4), nn.ReLU(), SparseSwitchNorm2d(4))
    assert set_sparsestmax_radius(model, 0.25) == 2
    assert model[1].radius.item() == pytest.approx(0.25) and model[3].radius.item() == pytest.approx(0.25)


def test_ssn_no_grad_training_pass_does_not_fix_weights():
    # Statistics passes (finalize_batch_average) run in train mode without gradients: no flag may flip there.
    layer = SparseSwitchNorm2d(3)
    with torch.no_grad():
        layer.mean_weight.copy_(torch.tensor([5.0, 0.0, 0.0]))
    layer.train()
    with torch.no_grad():
        layer(torch.randn(4, 3, 5, 5))
    assert layer.mean_fixed.item() == 0
    assert torch.equal(layer.mean_weight.detach(), torch.tensor([5.0, 0.0, 0.0]))
    layer(torch.randn(4, 3, 5, 5))  # a real training forward fixes it
    assert layer.mean_fixed.item() == 1


def test_fixed_weights_stay_one_hot_under_weight_decay_with_zeroed_grads():
    layer = SparseSwitchNorm2d(3)
    with torch.no_grad():
        layer.var_weight.copy_(torch.tensor([0.0, 4.0, 0.0]))
    layer.train()
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5, weight_decay=0.1)
    x = torch.randn(4, 3, 5, 5)
    for _ in range(3):
        optimizer.zero_grad(set_to_none=False)
        layer(x).pow(2).mean().backward()
        optimizer.step()
    assert layer.var_fixed.item() == 1
    assert not torch.equal(layer.var_weight.detach(), torch.tensor([0.0, 1.0, 0.0]))  # decay touched the raw vector
    _, var_probs = layer.importance_weights()
    assert torch.equal(var_probs, torch.tensor([0.0, 1.0, 0.0]))  # the weights used are still exactly one-hot


def test_ssn_eval_weights_follow_every_change_of_their_inputs():
    """Eval reuses the last sparsestmax result only while the raw weights, radius and flags are unchanged: a new
    radius, an in-place update (an optimiser step, load_state_dict), a change of dtype all give fresh weights, equal
    to sparsestmax computed anew."""
    from snzoo.nn.sparsestmax import sparsestmax as fresh

    layer = SparseSwitchNorm2d(4).eval()
    with torch.no_grad():
        layer.mean_weight.copy_(torch.tensor([0.3, -0.2, 0.1]))
        layer.var_weight.copy_(torch.tensor([-0.1, 0.4, 0.0]))

    def expected():
        return fresh(layer.mean_weight.detach(), float(layer.radius)), fresh(layer.var_weight.detach(), float(layer.radius))

    def check():
        with torch.no_grad():
            got = layer.importance_weights()
        for a, b in zip(got, expected()):
            torch.testing.assert_close(a, b, rtol=0, atol=0)

    check()
    layer.set_radius(0.6)
    check()
    with torch.no_grad():
        layer.mean_weight.add_(torch.tensor([0.5, 0.0, -0.5]))
    check()
    layer.load_state_dict({**layer.state_dict(), "var_weight": torch.tensor([1.0, -1.0, 0.2])})
    check()
    layer.double()
    check()
    assert layer.importance_weights()[0].dtype == torch.float64
