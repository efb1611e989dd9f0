"""What an SN layer's call does around its one CPU-kernel operator: which inputs take it, and the importance
weights it reuses while no gradient flows through them (refreshed whenever the raw parameters change)."""

from __future__ import annotations

import copy

import pytest
import torch

from snzoo.nn import SparseSwitchNorm2d, SwitchNorm1d, SwitchNorm2d, SwitchNorm3d, cpu_kernels
from snzoo.nn.functional import use_implementation

try:  # tests/ as a package or as a plain directory on sys.path
    from .sn_testing import randomise, spread_input
except ImportError:
    from sn_testing import randomise, spread_input


pytestmark = pytest.mark.usefixtures("kernel_built")


def _layouts(x: torch.Tensor) -> list[torch.Tensor]:
    """x in every dense layout and a few that are not: permuted, sliced, expanded."""
    views = [x, x.movedim(1, -1).contiguous().movedim(-1, 1)]
    if x.dim() == 4:
        views += [x.contiguous(memory_format=torch.channels_last), x.transpose(2, 3), x[:, :, ::2]]
    if x.dim() == 5:
        views += [x.contiguous(memory_format=torch.channels_last_3d), x[..., ::2]]
    views += [x[:, :1].expand_as(x), x.transpose(0, 1)]
    return views


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (1, 3, 1, 5), (2, 1, 4, 4), (3, 4, 1, 1), (1, 1, 2, 1), (2, 3, 6),
                                   (2, 3, 1), (2, 3, 2, 3, 4), (2, 3, 1, 1, 2), (0, 3, 4, 4)])
def test_fits_agrees_with_what_the_operator_accepts(shape):
    """The layer's quick layout test (no movedim view for 4-D and 5-D) says yes exactly where the dense-layout
    rule says yes, and the operator takes every input it says yes to."""
    x = torch.randn(shape)
    for view in _layouts(x) if x.numel() else [x]:
        values_per_row = view.numel() // max(1, view.shape[0] * view.shape[1])
        dense = view.is_contiguous() or view.movedim(1, -1).is_contiguous()
        expected = view.numel() > 0 and values_per_row >= 2 and dense
        assert cpu_kernels.fits(view) == expected, (shape, view.shape, view.stride())
        if expected:
            torch.ops.snzoo.sn_moments(view)  # raises where the operator refuses the layout


@pytest.mark.parametrize("make, shape", [(lambda: SwitchNorm2d(5), (4, 5, 6, 7)),
                                         (lambda: SwitchNorm2d(5, using_bn=False), (4, 5, 6, 7)),
                                         (lambda: SwitchNorm3d(5), (2, 5, 3, 4, 5)),
                                         (lambda: SwitchNorm1d(5), (4, 5, 9)),
                                         (lambda: SparseSwitchNorm2d(5), (4, 5, 6, 7))])
@pytest.mark.parametrize("training", [False, True])
def test_the_direct_call_equals_the_dispatched_one(make, shape, training, monkeypatch):
    """The layer's direct operator call gives the output, gradients and buffers of functional.switch_norm's route, bit
    for bit; the raw importance weights' gradient to float32 rounding (the direct call takes the softmax's backward
    inside the operator, in float64, the other route in torch's float32 softmax backward)."""
    from snzoo.nn import functional

    base = randomise(make(), seed=3, buffers=True).train(training)
    x = spread_input(shape, torch.float32, seed=4)
    results = {}
    for route in ("direct", "dispatched"):
        if route == "dispatched":
            monkeypatch.setattr(functional, "takes_whole_layer", lambda x: False)  # the kernel, through the dispatch
        layer, xr = copy.deepcopy(base), x.clone().requires_grad_(True)
        y = layer(xr)
        y.backward(torch.cos(torch.arange(y.numel(), dtype=y.dtype)).reshape(y.shape))
        results[route] = [y, xr.grad, layer.weight.grad, layer.mean_weight.grad, *layer.buffers()]
    for index, (got, want) in enumerate(zip(results["direct"], results["dispatched"])):
        exact = index != 3 or isinstance(base, SparseSwitchNorm2d)  # 3: mean_weight.grad
        torch.testing.assert_close(got, want, rtol=0 if exact else 2e-6, atol=0 if exact else 1e-7)


def test_importance_weights_are_reused_only_while_their_parameters_are_unchanged():
    layer = randomise(SwitchNorm2d(4), seed=1).eval()
    with torch.no_grad():
        first = layer.importance_weights()
        assert layer.importance_weights()[0] is first[0]  # reused
        layer.mean_weight.add_(torch.tensor([1.0, 0.0, -1.0]))  # an optimizer's in-place step
        second = layer.importance_weights()
    assert second[0] is not first[0]
    torch.testing.assert_close(second[0], torch.softmax(layer.mean_weight.detach(), 0), rtol=0, atol=0)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    state["var_weight"] = torch.tensor([3.0, 0.0, 0.0])
    layer.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(layer.importance_weights()[1], torch.softmax(state["var_weight"], 0))
    layer.double()  # a new tensor in the parameter: its dtype and storage change
    with torch.no_grad():
        assert layer.importance_weights()[0].dtype == torch.float64


def test_importance_weights_carry_gradients_whenever_they_are_needed():
    layer = randomise(SwitchNorm2d(4), seed=2).eval()
    with torch.no_grad():
        layer.importance_weights()
    probs = layer.importance_weights()  # grad mode: a fresh softmax on the autograd graph
    assert probs[0].requires_grad and probs[0].grad_fn is not None
    x = spread_input((2, 4, 3, 3), torch.float32, seed=5)
    layer(x).sum().backward()
    assert layer.mean_weight.grad is not None and layer.var_weight.grad is not None


def test_the_reference_implementation_still_runs_when_chosen(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_kernels, "switch_norm", lambda *a, **kw: calls.append(1))
    layer = randomise(SwitchNorm2d(4), seed=2, buffers=True).eval()
    with use_implementation("reference"), torch.no_grad():
        layer(spread_input((2, 4, 3, 3), torch.float32, seed=6))
    assert calls == []


def test_a_parametrized_weight_is_the_one_the_layer_uses():
    """Parameters are looked up directly on the layer's call, but a parametrization (computed, not stored) still
    takes effect."""
    from torch.nn.utils import parametrize

    class Doubled(torch.nn.Module):
        def forward(self, weight):
            return 2 * weight

    layer = randomise(SwitchNorm2d(4), seed=7, buffers=True).eval()
    x = spread_input((2, 4, 3, 3), torch.float32, seed=8)
    with torch.no_grad():
        plain = layer(x)
        parametrize.register_parametrization(layer, "weight", Doubled())
        doubled = layer(x)
    bias = layer.bias.detach().reshape(1, 4, 1, 1)
    torch.testing.assert_close(doubled - bias, 2 * (plain - bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [lambda: SwitchNorm2d(4), lambda: SparseSwitchNorm2d(4)])
def test_layers_made_and_run_in_inference_mode(make):
    """Inference tensors keep no version counter: nothing is reused by version, and the running update still runs."""
    x = spread_input((2, 4, 3, 3), torch.float32, seed=9)
    with torch.inference_mode():
        layer = randomise(make(), seed=10, buffers=True)
        before = layer.running_mean.clone()
        trained = layer.train()(x)
        assert not torch.equal(layer.running_mean, before)
        evaluated = [layer.eval()(x) for _ in range(2)]
    reference = copy.deepcopy(layer)
    with torch.no_grad():
        reference.load_state_dict({k: v.clone() for k, v in layer.state_dict().items()})
        torch.testing.assert_close(evaluated[0], reference.eval()(x.clone()))
    torch.testing.assert_close(evaluated[0], evaluated[1], rtol=0, atol=0)
    assert trained.shape == x.shape
