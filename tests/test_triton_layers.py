"""SN layers on the Triton passes (opted in with SNZOO_TRITON=1), run by triton's interpreter on CPU tensors with the
CPU kernel switched off: a training step and eval equal the float64 reference path, and the passes are the ones
called. On a GPU the same code runs compiled."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("triton")

from snzoo.nn import SwitchNorm2d, _triton_kernels, cpu_kernels  # noqa: E402
from snzoo.nn.functional import use_implementation  # noqa: E402

try:  # tests/ as a package or as a plain directory on sys.path
    from .sn_testing import randomise, spread_input
except ImportError:
    from sn_testing import randomise, spread_input


@pytest.fixture
def triton_passes(monkeypatch):
    """The Triton passes on, in the interpreter; the CPU kernel off; every pass call recorded."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("SNZOO_TRITON", "1")
    monkeypatch.setattr(cpu_kernels, "_enabled", False)
    calls = []
    for name in ("moments", "apply_affine", "grad_sums", "grad_input"):
        original = getattr(_triton_kernels, name)
        monkeypatch.setattr(_triton_kernels, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    return calls


def _step(layer, x, g, impl):
    x = x.clone().requires_grad_(True)
    with use_implementation(impl):
        y = layer(x)
        y.backward(g.to(y.dtype))
    return [y, x.grad, layer.weight.grad, layer.bias.grad, layer.mean_weight.grad, layer.var_weight.grad,
            layer.running_mean, layer.running_var]


TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("ghost", [None, 2])
def test_a_training_step_on_the_triton_passes_equals_the_float64_reference(triton_passes, dtype, layout, ghost):
    base = randomise(SwitchNorm2d(5), seed=40, buffers=True).train()
    base.ghost_batch_size = ghost
    x = spread_input((4, 5, 3, 6), torch.float64, seed=41)
    g = spread_input((4, 5, 3, 6), torch.float64, seed=42)
    if layout == "channels_last":
        x, g = (t.contiguous(memory_format=torch.channels_last) for t in (x, g))
    want = _step(copy.deepcopy(base).double(), x, g, "reference")
    got = _step(copy.deepcopy(base), x.to(dtype), g.to(dtype), "fused")
    assert triton_passes == ["moments", "apply_affine", "grad_sums", "grad_input"]
    assert got[0].dtype == dtype and got[0].stride() == x.stride() and got[1].stride() == x.stride()
    for name, a, b in zip(["y", "dx", "dw", "db", "dmw", "dvw", "rm", "rv"], got, want):
        scale = float(b.detach().abs().max())
        assert float((a.detach().double() - b.detach()).abs().max()) <= TOL[dtype] * scale, name


def test_eval_on_the_triton_passes_equals_the_float64_reference(triton_passes):
    layer = randomise(SwitchNorm2d(5), seed=43, buffers=True).eval()
    x = spread_input((3, 5, 4, 4), torch.float64, seed=44, mean=1e4, std=1e-2)
    with torch.no_grad():
        with use_implementation("reference"):
            want = copy.deepcopy(layer).double()(x)
        with use_implementation("fused"):
            got = layer(x.float())
    assert triton_passes == ["moments", "apply_affine"]
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-4 * float(want.abs().max()))


def test_without_the_opt_in_the_triton_passes_stay_off(triton_passes, monkeypatch):
    monkeypatch.delenv("SNZOO_TRITON")
    layer = randomise(SwitchNorm2d(5), seed=45, buffers=True).train()
    _step(layer, spread_input((2, 5, 3, 3), torch.float32, seed=46), torch.ones(2, 5, 3, 3), "fused")
    assert triton_passes == []
