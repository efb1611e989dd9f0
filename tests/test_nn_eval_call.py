"""An SN layer in eval mode without gradients is one call of the kernel's operator behind a few checks
(snzoo/nn/_eval_call.py): the same values as the layer's general path, and never a stale argument."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from snzoo.nn import SparseSwitchNorm2d, SwitchNorm1d, SwitchNorm2d, SwitchNorm3d, cpu_kernels, drop_bn_branch
from snzoo.nn import freeze_switchnorm
from snzoo.nn.functional import use_implementation

try:  # tests/ as a package or as a plain directory on sys.path
    from .sn_testing import randomise, spread_input
except ImportError:
    from sn_testing import randomise, spread_input


pytestmark = pytest.mark.usefixtures("kernel_built")


def _general(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's general path on x: the same eval forward with gradients on (which the short path leaves alone)."""
    with torch.enable_grad():
        return layer(x).detach()


LAYERS = {
    "sn": (lambda: SwitchNorm2d(6), (3, 6, 5, 7)),
    "sn_no_bn": (lambda: SwitchNorm2d(6, using_bn=False), (3, 6, 5, 7)),
    "sn1d_ncl": (lambda: SwitchNorm1d(6), (3, 6, 9)),
    "sn3d": (lambda: SwitchNorm3d(6), (3, 6, 2, 3, 4)),
    "ssn": (lambda: SparseSwitchNorm2d(6), (3, 6, 5, 7)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_short_path_is_one_kernel_call_with_the_general_paths_values(kind, layout, dtype, kernel_calls):
    make, shape = LAYERS[kind]
    if layout == "channels_last" and len(shape) != 4:
        pytest.skip("channels_last is 4-D")
    layer = randomise(make(), seed=1, buffers=True).eval().to(dtype)
    x = spread_input(shape, dtype, seed=2)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    general = _general(layer, x)
    kernel_calls.clear()
    with torch.no_grad():
        first, second = layer(x), layer(x)
    with torch.inference_mode():
        third = layer(x)
    assert len(kernel_calls) == 3
    assert torch.equal(first, general) and torch.equal(second, general) and torch.equal(third, general)


def test_importance_weights_are_found_once_and_reused(monkeypatch):
    layer = randomise(SwitchNorm2d(4), seed=3, buffers=True).eval()
    x = spread_input((2, 4, 5, 5), torch.float32, seed=4)
    found = []
    original = SwitchNorm2d.importance_weights
    monkeypatch.setattr(SwitchNorm2d, "importance_weights", lambda self: found.append(1) or original(self))
    with torch.no_grad():
        for _ in range(5):
            layer(x)
    assert len(found) == 1


def _changes():
    """Ways the values a layer's call depends on change, each with the layer (and input) it applies to."""

    def step(layer):  # an optimizer step on every parameter (the raw importance weights in place)
        for p in layer.parameters():
            p.grad = torch.ones_like(p)
        torch.optim.SGD(layer.parameters(), lr=0.3).step()

    def load(layer):
        state = {k: v + 0.25 if v.is_floating_point() else v for k, v in layer.state_dict().items()}
        layer.load_state_dict(state)

    def load_assign(layer):
        state = {k: v.clone() * 1.5 if v.is_floating_point() else v for k, v in layer.state_dict().items()}
        layer.load_state_dict(state, assign=True)

    def new_parameter(layer):
        layer.mean_weight = nn.Parameter(torch.tensor([2.0, -1.0, 0.5]))

    def fill(layer):
        with torch.no_grad():
            layer.var_weight.fill_(0.1).index_fill_(0, torch.tensor([1]), 3.0)

    def eps(layer):
        layer.eps = 0.5

    def running(layer):
        layer.running_var.mul_(4.0)

    def drop_bn(layer):
        drop_bn_branch(layer)

    def functional_weights(layer):  # torch.func.functional_call puts other tensors in the layer's dicts directly
        return {"weight": layer.weight.detach() * 3, "mean_weight": torch.tensor([0.0, 4.0, 0.0])}

    return {"step": step, "load": load, "load_assign": load_assign, "new_parameter": new_parameter, "fill": fill,
            "eps": eps, "running": running, "drop_bn": drop_bn, "functional_call": functional_weights}


@pytest.mark.parametrize("change", sorted(_changes()))
def test_a_change_to_the_layer_is_seen_by_its_next_call(change):
    layer = randomise(SwitchNorm2d(3), seed=5, buffers=True).eval()
    x = spread_input((2, 3, 4, 4), torch.float32, seed=6)
    with torch.no_grad():
        before = layer(x)
    override = _changes()[change](layer)
    with torch.no_grad():
        if override is not None:
            after = torch.func.functional_call(layer, override, (x,))
            reference = copy.deepcopy(layer)
            for name, value in override.items():
                getattr(reference, name).data = value.clone()
            expected = _general(reference, x)
        else:
            after, expected = layer(x), _general(layer, x)
    assert not torch.equal(after, before)
    assert torch.equal(after, expected)


def test_sparse_switchnorm_follows_its_radius_and_fixed_flags():
    layer = randomise(SparseSwitchNorm2d(3), seed=7, buffers=True).eval()
    x = spread_input((2, 3, 4, 4), torch.float32, seed=8)
    seen = []
    for radius in (0.0, 0.6, 0.95):
        layer.set_radius(radius)
        with torch.no_grad():
            seen.append(layer(x))
        assert torch.equal(seen[-1], _general(layer, x))
    layer.set_radius(0.0)
    with torch.no_grad():
        open_weights = layer(x)
        layer.var_fixed.fill_(1)  # the one-hot of the stored vector from now on
        fixed = layer(x)
    assert torch.equal(fixed, _general(layer, x)) and not torch.equal(fixed, open_weights)
    assert not torch.equal(seen[0], seen[1])


def test_dtype_and_copies_get_their_own_arguments():
    layer = randomise(SwitchNorm2d(3), seed=9, buffers=True).eval()
    x = spread_input((2, 3, 4, 4), torch.float32, seed=10)
    with torch.no_grad():
        layer(x)
        twin = copy.deepcopy(layer)
        frozen = freeze_switchnorm(copy.deepcopy(layer))
        with torch.no_grad():
            twin.weight.mul_(2)
        assert torch.equal(layer(x), _general(layer, x)) and torch.equal(twin(x), _general(twin, x))
        assert torch.equal(frozen(x), layer(x))
        layer.double()
        y = layer(x.double())
        assert y.dtype == torch.float64 and torch.equal(y, _general(layer, x.double()))
        layer.bfloat16()  # the raw importance weights rounded: other softmax values
        y = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16 and torch.equal(y, _general(layer, x.bfloat16()))


def test_a_dtype_change_without_buffers_is_seen():
    """Without running buffers no tensor object changes in .to(dtype): the parameters keep their identity and version
    counters, so the layer drops its arguments itself (the bfloat16 raw weights give other softmax values)."""
    layer = randomise(SwitchNorm2d(3, using_bn=False), seed=13).eval()
    with torch.no_grad():
        layer.mean_weight.copy_(torch.tensor([0.1234567, -0.7654321]))
    x = spread_input((2, 3, 4, 4), torch.float32, seed=14)
    with torch.no_grad():
        layer(x)
        raw = layer.mean_weight
        layer.bfloat16()
        assert layer.mean_weight is raw
        y = layer(x.bfloat16())
    assert torch.equal(y, _general(layer, x.bfloat16()))


def test_what_the_short_path_leaves_to_the_general_one(kernel_calls):
    """A strided input, single values per (sample, channel), an empty batch, the kernel or the fused implementation
    switched off, gradients on and training mode take the general path (which may still end in the kernel)."""
    layer = randomise(SwitchNorm2d(4), seed=11, buffers=True).eval()
    x = spread_input((2, 4, 6, 6), torch.float32, seed=12)
    with torch.no_grad():
        strided = x[:, :, ::2, ::2]
        torch.testing.assert_close(layer(strided), layer(strided.contiguous()), rtol=1e-6, atol=1e-6)
        assert layer(x[:, :, :1, :1]).shape == (2, 4, 1, 1)
        assert layer(x[:0]).shape == (0, 4, 6, 6)
        with cpu_kernels.use_kernel(False):
            kernel_calls.clear()
            off = layer(x)
            assert kernel_calls == []
        with use_implementation("reference"):
            kernel_calls.clear()
            reference = layer(x)
            assert kernel_calls == []
        torch.testing.assert_close(off, reference, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="got 3 channels"):
            layer(x[:, :3])
