"""The fused switchable-normalisation path (snzoo.nn.fused) against the float64 NumPy reference and the reference path.

Outputs and running buffers are compared with tests/reference_sn.py; gradients (input, weight, bias and the raw
importance weights through softmax / sparsestmax) with autograd through `switch_norm_reference`. Every case runs
twice: with the CPU fast path (plain sums when well conditioned, BatchNorm kernels) and with the generic path
(shifted two-pass statistics and addcmul, what devices other than the CPU and torch.compile use).
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import snzoo
from snzoo.nn import (
    SparseSwitchNorm2d,
    SwitchNorm1d,
    SwitchNorm2d,
    SwitchNorm3d,
    cpu_kernels,
    functional as F_sn,
    fused,
    set_sparsestmax_radius,
)

try:  # tests/ as a package or as a plain directory on sys.path
    from . import reference_sn as ref
    from .sn_testing import TOL32, TOL64, fashion_mnist_batch, randomise, spread_input, terms_of as _terms, to_numpy as _np
except ImportError:
    import reference_sn as ref
    from sn_testing import TOL32, TOL64, fashion_mnist_batch, randomise, spread_input, terms_of as _terms, to_numpy as _np



# ------------------------------------------------------------------------------------------------ helpers
@pytest.fixture(params=["kernel", "fast", "generic"])
def fused_path(request, monkeypatch):
    """Run the fused implementation on snzoo's compiled CPU kernel ("kernel", which must build here), on PyTorch's
    CPU fast kernels ("fast"), or forced onto its generic path (what other devices and torch.compile run)."""
    if request.param == "kernel":
        assert cpu_kernels.available()
    else:
        monkeypatch.setattr(cpu_kernels, "_enabled", False)
    if request.param == "generic":
        monkeypatch.setattr(fused, "_fast_allowed", lambda x: False)
    with F_sn.use_implementation("fused"):
        yield request.param


def _randomise(layer: nn.Module, seed: int = 0) -> nn.Module:
    return randomise(layer, seed, buffers=True)


def _input(shape, dtype=torch.float64, seed=0, offset=0.3):
    return spread_input(shape, dtype, seed, mean=offset)


def _probs(layer):
    mean_probs, var_probs = layer.importance_weights()
    return _np(mean_probs), _np(var_probs)


def _numpy_step(layer, x):
    """The NumPy reference's output and new buffers for one forward of `layer` on x."""
    mean_probs, var_probs = _probs(layer)
    return ref.switch_norm(
        _np(x), _np(layer.weight), _np(layer.bias), None, None,
        _np(layer.running_mean) if layer.using_bn else None, _np(layer.running_var) if layer.using_bn else None,
        training=layer.training, momentum=layer.momentum, eps=layer.eps,
        using_moving_average=layer.using_moving_average, ghost_batch_size=layer.ghost_batch_size,
        mean_probs=mean_probs, var_probs=var_probs, terms=_terms(layer),
    )


def _upstream(shape, dtype, seed=99):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def _run(layer, x, impl, grad_y):
    """Forward + backward of a copy of `layer` with implementation impl: output, gradients, buffers."""
    layer = copy.deepcopy(layer)
    x = x.detach().clone().requires_grad_(True)
    with F_sn.use_implementation(impl):
        y = layer(x)
        y.backward(grad_y.to(y.dtype))
    grads = {"x": x.grad}
    grads.update({name: p.grad for name, p in layer.named_parameters()})
    buffers = {name: b.detach().clone() for name, b in layer.named_buffers()}
    return y.detach(), grads, buffers, layer


def _check_layer(layer, x, tol, grad_y=None, ref_input=None):
    """The fused path against the NumPy reference (output, buffers) and the reference path (all gradients).

    ref_input: the input the references see (e.g. x upcast to float64); the fused path runs on x.
    """
    ref_input = x if ref_input is None else ref_input
    grad_y = _upstream(x.shape, torch.float64) if grad_y is None else grad_y
    y_np, rm_np, rv_np = _numpy_step(layer, ref_input)
    ref_layer = copy.deepcopy(layer).to(ref_input.dtype)
    y_ref, grads_ref, _, _ = _run(ref_layer, ref_input, "reference", grad_y)
    y, grads, buffers, _ = _run(layer, x, "fused", grad_y)
    assert y.dtype == x.dtype and y.shape == x.shape
    np.testing.assert_allclose(_np(y), y_np, **tol)
    np.testing.assert_allclose(_np(y), _np(y_ref), **tol)
    if layer.using_bn:
        np.testing.assert_allclose(_np(buffers["running_mean"]), rm_np, **tol)
        np.testing.assert_allclose(_np(buffers["running_var"]), rv_np, **tol)
    for name, g_ref in grads_ref.items():
        g = grads[name]
        if g_ref is None:
            assert g is None, name
            continue
        assert g is not None and g.dtype == (x.dtype if name == "x" else layer.weight.dtype), name
        scale = max(float(g_ref.abs().max()), 1.0)
        np.testing.assert_allclose(_np(g), _np(g_ref), rtol=tol["rtol"], atol=tol["atol"] * scale, err_msg=name)
    return y


# ----------------------------------------------------------------------------------- every mode, float64
SHAPES_2D = [(4, 5, 3, 3), (4, 3, 1, 1), (4, 3, 1, 2), (1, 3, 3, 2)]


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("using_bn", [True, False])
@pytest.mark.parametrize("using_moving_average", [True, False])
@pytest.mark.parametrize("shape", SHAPES_2D)
def test_switchnorm2d_matches_references(fused_path, training, using_bn, using_moving_average, shape):
    layer = _randomise(SwitchNorm2d(shape[1], momentum=0.8, using_moving_average=using_moving_average,
                                    using_bn=using_bn), seed=1).double()
    layer.train(training)
    _check_layer(layer, _input(shape, seed=2), TOL64)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("k,shape", [(2, (8, 3, 3, 3)), (1, (4, 3, 2, 2)), (3, (6, 2, 1, 1))])
def test_ghost_batches_match_references(fused_path, training, k, shape):
    layer = _randomise(SwitchNorm2d(shape[1], momentum=0.7), seed=3).double()
    layer.ghost_batch_size = k
    layer.train(training)
    _check_layer(layer, _input(shape, seed=4), TOL64)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(4, 3, 6), (5, 3, 1), (1, 2, 5)])
def test_switchnorm1d_ncl_matches_references(fused_path, training, shape):
    layer = _randomise(SwitchNorm1d(shape[1], momentum=0.9), seed=5).double()
    layer.train(training)
    _check_layer(layer, _input(shape, seed=6), TOL64)
    # channels-innermost (N, L, C) storage, e.g. a transposed sequence batch
    x = _input((shape[0], shape[2], shape[1]), seed=7).transpose(1, 2)
    _check_layer(layer, x, TOL64, ref_input=x.contiguous())


@pytest.mark.parametrize("training", [True, False])
def test_switchnorm3d_matches_references(fused_path, training):
    layer = _randomise(SwitchNorm3d(3), seed=8).double()
    layer.train(training)
    _check_layer(layer, _input((2, 3, 2, 3, 2), seed=9), TOL64)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("radius", [0.0, 0.3])
def test_sparse_switchnorm_matches_references(fused_path, training, radius):
    layer = _randomise(SparseSwitchNorm2d(3, momentum=0.8), seed=10).double()
    with torch.no_grad():  # raw values whose sparsestmax is a mix of all three terms
        layer.mean_weight.copy_(torch.tensor([0.3, 0.1, -0.1]))
        layer.var_weight.copy_(torch.tensor([0.1, 0.25, 0.0]))
    set_sparsestmax_radius(layer, radius)
    mean_probs, var_probs = _probs(layer)
    assert mean_probs.max() < 1 and var_probs.max() < 1  # a real mix, with gradients
    layer.train(training)
    _check_layer(layer, _input((4, 3, 3, 3), seed=11), TOL64)


def test_sparse_switchnorm_with_fixed_one_hot_weights(fused_path):
    layer = _randomise(SparseSwitchNorm2d(3), seed=12).double()
    with torch.no_grad():
        layer.mean_weight.copy_(torch.tensor([0.0, 1.0, 0.0]))
        layer.mean_fixed.fill_(1)
    _check_layer(layer, _input((4, 3, 2, 3), seed=13), TOL64)


def test_several_training_steps_then_eval_match_numpy(fused_path):
    """Running buffers accumulate identically over steps, in both averaging modes."""
    for using_moving_average in (True, False):
        layer = _randomise(SwitchNorm2d(4, momentum=0.6, using_moving_average=using_moving_average), seed=14)
        layer = layer.double()
        for step in range(3):
            x = _input((3, 4, 2, 5), seed=20 + step, offset=0.5 * step)
            y_np, rm_np, rv_np = _numpy_step(layer, x)
            np.testing.assert_allclose(_np(layer(x)), y_np, **TOL64)
            np.testing.assert_allclose(_np(layer.running_mean), rm_np, **TOL64)
            np.testing.assert_allclose(_np(layer.running_var), rv_np, **TOL64)
        layer.eval()
        y_np, _, _ = _numpy_step(layer, x)
        with torch.no_grad():
            np.testing.assert_allclose(_np(layer(x)), y_np, **TOL64)


# ------------------------------------------------------------------------------- eval without gradients
EVAL_LAYERS = {
    "sn": lambda: SwitchNorm2d(6),
    "sn_no_bn": lambda: SwitchNorm2d(6, using_bn=False),
    "sn1d_ncl": lambda: SwitchNorm1d(6),
    "sn3d": lambda: SwitchNorm3d(6),
}
EVAL_SHAPES = {"sn": (3, 6, 4, 5), "sn_no_bn": (3, 6, 4, 5), "sn1d_ncl": (3, 6, 7), "sn3d": (3, 6, 2, 3, 2)}


def _watch_kernel_layer(monkeypatch) -> list:
    """Record every call of the kernel's whole-layer operator (one per SN layer and forward)."""
    calls = []
    whole_layer = cpu_kernels.switch_norm

    def spy(x, *args, **kwargs):
        calls.append((tuple(x.shape), x.dtype))
        return whole_layer(x, *args, **kwargs)

    monkeypatch.setattr(cpu_kernels, "switch_norm", spy)
    return calls


def _eval_backend(backend, monkeypatch) -> None:
    """Run on the compiled CPU kernel ("kernel", which must build here) or on PyTorch ops."""
    if backend == "kernel":
        assert cpu_kernels.available()
    else:
        monkeypatch.setattr(cpu_kernels, "_enabled", False)


@pytest.mark.parametrize("backend", ["kernel", "pytorch"])
@pytest.mark.parametrize("kind", sorted(EVAL_LAYERS))
@pytest.mark.parametrize("dtype,tol", [(torch.float64, TOL64), (torch.float32, TOL32)])
def test_eval_without_gradients_is_one_kernel_call_and_matches_numpy(kind, dtype, tol, backend, monkeypatch):
    """In eval on the CPU a layer is one call of the kernel's operator where the kernel is on (none where it is
    off), and equals the float64 NumPy reference either way."""
    _eval_backend(backend, monkeypatch)
    calls = _watch_kernel_layer(monkeypatch)
    layer = _randomise(EVAL_LAYERS[kind](), seed=80).to(dtype).eval()
    x = _input(EVAL_SHAPES[kind], dtype, seed=81)
    y_np, _, _ = _numpy_step(layer, x)
    with F_sn.use_implementation("fused"), torch.no_grad():
        y = layer(x)
    assert calls == ([(tuple(x.shape), dtype)] if backend == "kernel" else [])
    assert y.dtype == dtype and y.is_contiguous()
    np.testing.assert_allclose(_np(y), y_np, **tol)


@pytest.mark.parametrize(
    "case",
    ["channels_last", "bfloat16", "training", "large_mean", "with_gradients", "single_value"],
)
def test_the_kernel_layer_takes_every_dense_input_but_single_values(case, monkeypatch):
    """channels_last, bfloat16, training, large means and gradients all go through the kernel's one operator; one
    value per (sample, channel) goes the PyTorch way; all match the reference."""
    calls = _watch_kernel_layer(monkeypatch)
    layer = _randomise(SwitchNorm2d(4), seed=82).eval()
    x = _input((2, 4, 3, 3), torch.float32, seed=83)
    if case == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif case == "bfloat16":
        x = x.bfloat16()
    elif case == "training":
        layer.train()
    elif case == "large_mean":
        x = x * 1e-3 + 1e3
    elif case == "single_value":
        x = x[:, :, :1, :1]
    y_np, _, _ = _numpy_step(copy.deepcopy(layer), x.float())
    with F_sn.use_implementation("fused"), torch.set_grad_enabled(case == "with_gradients"):
        y = layer(x.requires_grad_(case == "with_gradients"))
    assert len(calls) == (0 if case == "single_value" else 1)
    if case == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
    tol = dict(rtol=2e-2, atol=2e-2) if case == "bfloat16" else TOL32
    np.testing.assert_allclose(_np(y.float()), y_np, **tol)


# ------------------------------------------------------------------------------------------- gradcheck
def _function(x, weight, bias, mean_probs, var_probs, rm, rv, terms, training, k, allow_fast):
    plan = fused._Plan(tuple(terms), training, 1e-5, k, None, allow_fast)
    y, _, _ = fused._SwitchNormFunction.apply(x, weight, bias, mean_probs, var_probs, rm, rv, plan)
    return y


def _kernel_layer(x, weight, bias, mean_probs, var_probs, rm, rv, terms, training, k, logits=False):
    """The kernel's whole-layer operator (autograd in C++); the running buffers copied, so that gradcheck's
    repeated forwards all see the same ones. logits: the probabilities are raw weights, softmax taken inside."""
    rm = None if rm is None else rm.clone()
    rv = None if rv is None else rv.clone()
    return cpu_kernels.switch_norm(x, weight, bias, mean_probs, var_probs, cpu_kernels.term_slots(terms), k, rm, rv,
                                   training, 0.9, True, 1e-5, logits)


def _gradcheck_inputs(shape, n_terms, seed, channels_last=False):
    """float64 x, weight, bias and probabilities (requiring gradients) and running buffers for a gradcheck."""
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = torch.randn(shape, generator=g, dtype=torch.float64) + 0.5
    if channels_last and x.dim() in (4, 5):
        x = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    weight = torch.randn(1, c, *([1] * (len(shape) - 2)), generator=g, dtype=torch.float64) + 1
    bias = torch.randn(weight.shape, generator=g, dtype=torch.float64)
    mean_probs = torch.softmax(torch.randn(n_terms, generator=g, dtype=torch.float64), 0)
    var_probs = torch.softmax(torch.randn(n_terms, generator=g, dtype=torch.float64), 0)
    rm = torch.randn(1, c, 1, generator=g, dtype=torch.float64)
    rv = torch.rand(1, c, 1, generator=g, dtype=torch.float64) + 0.5
    return tuple(t.requires_grad_(True) for t in (x, weight, bias, mean_probs, var_probs)), rm, rv


@pytest.mark.parametrize(
    "shape,terms,training,k",
    [
        ((4, 3, 5), ("in", "ln", "bn"), True, 4),
        ((4, 3, 5), ("in", "ln", "bn"), True, 2),
        ((4, 3, 5), ("in", "ln", "bn"), False, 4),
        ((3, 2, 4), ("in", "ln"), True, 3),
        ((3, 4, 1), ("in", "ln", "bn"), True, 3),
        ((4, 3, 6), ("ln", "bn"), True, 4),
        ((2, 3, 2, 3), ("in", "ln", "bn"), True, 2),
    ],
)
@pytest.mark.parametrize("allow_fast", [True, False])
def test_gradcheck_of_the_function(shape, terms, training, k, allow_fast):
    inputs, rm, rv = _gradcheck_inputs(shape, len(terms), seed=30)
    assert torch.autograd.gradcheck(
        lambda *t: _function(*t, rm, rv, terms, training, k, allow_fast), inputs, eps=1e-6, atol=1e-7
    )


@pytest.mark.parametrize(
    "shape,terms,training,k",
    [
        ((4, 3, 5), ("in", "ln", "bn"), True, 4),
        ((4, 3, 5), ("in", "ln", "bn"), True, 2),
        ((4, 3, 5), ("in", "ln", "bn"), False, 4),
        ((3, 2, 4), ("in", "ln"), True, 3),
        ((4, 3, 6), ("ln", "bn"), True, 4),
        ((4, 3, 6), ("ln", "bn"), False, 4),
        ((1, 3, 2, 3), ("in", "ln", "bn"), True, 1),
        ((2, 3, 2, 3), ("in", "ln", "bn"), True, 2),
        ((2, 3, 2, 3, 2), ("in", "ln", "bn"), True, 1),
    ],
)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("logits", [False, True])
def test_gradcheck_of_the_kernel_layer(shape, terms, training, k, channels_last, logits):
    """The compiled operator's C++ backward against finite differences in float64: input, weight, bias and both
    probability vectors (or, with logits, the raw weights whose softmax the operator takes), with ghost batches, eval
    BN on running buffers, batch 1, 1d / 2d / 3d, channels_last."""
    assert cpu_kernels.available()
    inputs, rm, rv = _gradcheck_inputs(shape, len(terms), seed=32, channels_last=channels_last)
    if logits:  # raw weights of any sign and scale instead of probabilities
        inputs = (*inputs[:3], *(torch.randn(len(terms), dtype=torch.float64, generator=torch.Generator().manual_seed(
            33 + i)).mul(2).requires_grad_(True) for i in range(2)))
    assert torch.autograd.gradcheck(
        lambda *t: _kernel_layer(*t, rm, rv, terms, training, k, logits), inputs, eps=1e-6, atol=1e-7
    )


def test_raw_weights_in_the_operator_equal_softmax_outside():
    """logits=True equals the operator on torch.softmax of the raw weights: output bit for bit (the same softmax
    values), raw-weight gradients to float64 rounding."""
    inputs, rm, rv = _gradcheck_inputs((4, 3, 5, 2), 3, seed=34)
    x, weight, bias = (t.detach().requires_grad_(True) for t in inputs[:3])
    raw = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in ([0.3, -1.2, 2.0], [1.5, 0.0, -0.4])]
    grad_y = torch.randn(4, 3, 5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(35))
    inside = _kernel_layer(x, weight, bias, *raw, rm, rv, ("in", "ln", "bn"), True, 4, logits=True)
    inside_grads = torch.autograd.grad(inside, [x, *raw], grad_y)
    outside = _kernel_layer(x, weight, bias, *(torch.softmax(r, 0) for r in raw), rm, rv, ("in", "ln", "bn"), True, 4)
    outside_grads = torch.autograd.grad(outside, [x, *raw], grad_y)
    assert torch.equal(inside, outside) and torch.equal(inside_grads[0], outside_grads[0])
    for got, want in zip(inside_grads[1:], outside_grads[1:]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_gradcheck_channels_last():
    inputs, _, _ = _gradcheck_inputs((2, 3, 2, 3), 3, seed=31, channels_last=True)
    terms = ("in", "ln", "bn")
    assert torch.autograd.gradcheck(
        lambda *t: _function(*t, None, None, terms, True, 2, True), inputs, eps=1e-6, atol=1e-7
    )


# ---------------------------------------------------------------------------------------- stress inputs
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(4, 5, 8, 8), (4, 5, 1, 2)])
def test_large_mean_small_spread_stays_accurate(fused_path, training, shape):
    """mean 1e4, std 1e-2: a plain sum of squares (and float32 means) cancel; the fused float32 path must not.

    Gradients are checked w.r.t. the importance weights after softmax (what switch_norm receives): the float32
    softmax backward of gradients of size ~1e4 * sum(dmu) cancels on its own, in any implementation.
    """
    g = torch.Generator().manual_seed(40)
    x32 = (torch.randn(shape, generator=g, dtype=torch.float64) * 1e-2 + 1e4).float()
    c = shape[1]
    weight = torch.rand(1, c, 1, 1, generator=g, dtype=torch.float64) + 0.5
    bias = torch.randn(1, c, 1, 1, generator=g, dtype=torch.float64)
    mean_probs = torch.softmax(torch.randn(3, generator=g, dtype=torch.float64), 0)
    var_probs = torch.softmax(torch.randn(3, generator=g, dtype=torch.float64), 0)
    running = (torch.full((1, c, 1), 1e4, dtype=torch.float64), torch.full((1, c, 1), 1e-4, dtype=torch.float64))
    # every input float32-representable, so that the float64 references see exactly what the float32 run sees
    # (probabilities rounded on their own would move the mixed mean ~1e4 by ~1e-3, a tenth of the spread)
    weight, bias, mean_probs, var_probs, *running = (
        t.float().double() for t in (weight, bias, mean_probs, var_probs, *running)
    )
    grad_y = _upstream(shape, torch.float64)

    def run(impl, dtype):
        tensors = (x32, weight, bias, mean_probs, var_probs)
        leaves = [t.detach().to(dtype).clone().requires_grad_(True) for t in tensors]
        rm, rv = (t.to(dtype) for t in running)
        with F_sn.use_implementation(impl):
            y = F_sn.switch_norm(*leaves, rm, rv, terms=F_sn.TERMS_SN, training=training, momentum=0.8, eps=1e-5)
        y.backward(grad_y.to(dtype))
        return y.detach(), [t.grad for t in leaves], rv

    def rel(a, b):
        return float((a.double() - b).norm() / max(float(b.norm()), 1e-30))

    y_ref, grads_ref, _ = run("reference", torch.float64)  # float64 on the float32 input
    y, grads, rv = run("fused", torch.float32)
    y_np, _, rv_np = ref.switch_norm(
        _np(x32), _np(weight), _np(bias), None, None, _np(running[0]), _np(running[1]), training=training,
        momentum=0.8, eps=1e-5, mean_probs=_np(mean_probs), var_probs=_np(var_probs),
    )
    assert torch.isfinite(y).all()
    assert rel(y, torch.from_numpy(y_np)) < 1e-3
    assert rel(y, y_ref) < 1e-3
    if training:
        assert rel(rv, torch.from_numpy(rv_np)) < 1e-3
    for name, grad, grad_ref in zip(("x", "weight", "bias", "mean_probs", "var_probs"), grads, grads_ref):
        assert rel(grad, grad_ref) < 1e-3, name


def test_stress_input_beats_the_float32_reference():
    """The same stress input through the float32 reference path is visibly wrong: the fused path is the fix."""
    g = torch.Generator().manual_seed(42)
    x = (torch.randn(4, 5, 8, 8, generator=g, dtype=torch.float64) * 1e-2 + 1e4).float()
    layer = _randomise(SwitchNorm2d(5), seed=43)
    y_np, _, _ = _numpy_step(layer, x)
    errors = {}
    for impl in ("reference", "fused"):
        with F_sn.use_implementation(impl), torch.no_grad():
            y = copy.deepcopy(layer)(x)
        errors[impl] = np.linalg.norm(_np(y) - y_np) / np.linalg.norm(y_np)
    assert errors["fused"] < 1e-4
    assert not errors["reference"] < 1e-2  # large, or NaN from a negative variance


# --------------------------------------------------------------------------------- layouts and dtypes
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, TOL64), (torch.float32, TOL32)])
def test_channels_last_inputs(fused_path, training, dtype, tol):
    layer = _randomise(SwitchNorm2d(6, momentum=0.8), seed=50).to(dtype).train(training)
    x = _input((4, 6, 5, 7), dtype, seed=51)
    xcl = x.to(memory_format=torch.channels_last)
    y = _check_layer(layer, xcl, tol, ref_input=x.double())
    assert y.is_contiguous(memory_format=torch.channels_last)
    # and the gradient w.r.t. the channels_last input
    xg = xcl.clone().requires_grad_(True)
    with F_sn.use_implementation("fused"):
        copy.deepcopy(layer)(xg).sum().backward()
    assert torch.isfinite(xg.grad).all()


def test_channels_last_3d_inputs(fused_path):
    layer = _randomise(SwitchNorm3d(4), seed=52).double()
    x = _input((2, 4, 3, 2, 3), seed=53)
    y = _check_layer(layer, x.to(memory_format=torch.channels_last_3d), TOL64, ref_input=x)
    assert y.is_contiguous(memory_format=torch.channels_last_3d)


def test_non_contiguous_inputs_and_upstream_gradients(fused_path):
    layer = _randomise(SwitchNorm2d(3), seed=54).double()
    x = _input((4, 3, 6, 8), seed=55)[:, :, ::2, 1::2]  # neither contiguous nor channels_last
    _check_layer(layer, x, TOL64, ref_input=x.contiguous())
    # an expanded (stride-0) upstream gradient, as y.sum().backward() produces
    _check_layer(layer, x, TOL64, grad_y=torch.ones(1, 1, 1, 1, dtype=torch.float64).expand(x.shape),
                 ref_input=x.contiguous())
    # every other sample of a batch (a strided (N, C, L) view), with a channels_last upstream gradient
    x = _input((8, 3, 4, 5), seed=56)[::2]
    grad_y = _upstream(x.shape, torch.float64).to(memory_format=torch.channels_last)
    _check_layer(layer, x, TOL64, grad_y=grad_y, ref_input=x.contiguous())


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_half_inputs_use_float32_statistics(fused_path, training, dtype, tol, channels_last):
    """float16 / bfloat16 input with float32 parameters: output and input gradient in the input dtype,
    matching the reference run on the same input upcast (the same upstream gradient, upcast too)."""
    layer = _randomise(SwitchNorm2d(4, momentum=0.8), seed=56).train(training)
    x = _input((4, 4, 5, 5), seed=57).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    grad_y = _upstream(x.shape, dtype).double()
    y_ref, grads_ref, buffers_ref, _ = _run(copy.deepcopy(layer).double(), x.double(), "reference", grad_y)
    y, grads, buffers, _ = _run(layer, x, "fused", grad_y)
    assert y.dtype == dtype and grads["x"].dtype == dtype and grads["weight"].dtype == torch.float32
    scale = float(y_ref.abs().max())
    np.testing.assert_allclose(_np(y), _np(y_ref), rtol=tol, atol=tol * scale)
    for name, g_ref in grads_ref.items():
        np.testing.assert_allclose(_np(grads[name]), _np(g_ref), rtol=tol, atol=tol * float(g_ref.abs().max()),
                                   err_msg=name)
    for name, b_ref in buffers_ref.items():
        np.testing.assert_allclose(_np(buffers[name]), _np(b_ref), rtol=1e-5, atol=1e-6, err_msg=name)


def test_half_module_and_input():
    """A module converted with .half() (half parameters and buffers) on half input."""
    layer = _randomise(SwitchNorm2d(4), seed=58)
    x = _input((4, 4, 3, 3), seed=59)
    with F_sn.use_implementation("fused"), torch.no_grad():
        y_half = copy.deepcopy(layer).half()(x.half())
    with F_sn.use_implementation("reference"), torch.no_grad():
        y_ref = copy.deepcopy(layer).half().double()(x.half().double())
    assert y_half.dtype == torch.float16
    np.testing.assert_allclose(_np(y_half), _np(y_ref), rtol=2e-3, atol=2e-3 * float(y_ref.abs().max()))


# ------------------------------------------------------------------------------------ whole model check
def _randomised_sn_model(name, seed):
    """An SN model with random importance weights and running statistics; zero-initialised last gammas set to
    small values so that gradients reach every layer (at gamma ~ 1 the random deep residual stack is so
    ill-conditioned that float32 gradients of any implementation are off by percents against float64)."""
    torch.manual_seed(seed)
    model = snzoo.create_model(name)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, SwitchNorm2d):
                module.mean_weight.copy_(torch.randn(module.mean_weight.shape, generator=g))
                module.var_weight.copy_(torch.randn(module.var_weight.shape, generator=g))
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=g) * 0.1)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=g) + 0.5)
                if not module.weight.any():
                    module.weight.copy_(torch.rand(module.weight.shape, generator=g) * 0.1 + 0.05)
    return model


def _rel(a, b):
    return float((a.double() - b.double()).norm() / max(float(b.double().norm()), 1e-30))


def _model_results(model, x, target, impl, dtype):
    m = copy.deepcopy(model).to(dtype)
    with F_sn.use_implementation(impl):
        m.eval()
        with torch.no_grad():
            logits_eval = m(x.to(dtype))
        m.train()
        torch.manual_seed(63)  # the same dropout mask
        loss = nn.functional.cross_entropy(m(x.to(dtype)), target)
        loss.backward()
    grads = {name: p.grad.clone() for name, p in m.named_parameters()}
    buffers = {name: b.clone() for name, b in m.named_buffers()}
    return logits_eval, loss.detach(), grads, buffers


def _grad_errors(grads, grads_ref):
    """Relative error of every gradient, split into (importance weights, everything else)."""
    errors = {name: _rel(grads[name], grads_ref[name]) for name in grads_ref}
    importance = {n: e for n, e in errors.items() if n.endswith(("mean_weight", "var_weight"))}
    return importance, {n: e for n, e in errors.items() if n not in importance}


@pytest.mark.parametrize(
    "name,size",
    [
        ("resnet50v1_sn", 64),
        ("resnet18v2_sn", 32),  # pre-activation blocks; 32x32: 1x1 maps in layer4
    ],
)
def test_resnet_sn_fused_and_reference_are_the_same_function(name, size):
    """float64: the same logits, loss, gradients of every parameter and running buffers, to 1e-9."""
    model = _randomised_sn_model(name, seed=60)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(62))
    target = torch.tensor([3, 7])
    le_r, loss_r, grads_r, buf_r = _model_results(model, x, target, "reference", torch.float64)
    le_f, loss_f, grads_f, buf_f = _model_results(model, x, target, "fused", torch.float64)
    assert _rel(le_f, le_r) < 1e-9
    assert abs(float(loss_f - loss_r)) < 1e-9 * max(1.0, abs(float(loss_r)))
    assert all(float(grads_r[n].abs().max()) > 0 for n in grads_r)  # gradients reach every layer
    importance, others = _grad_errors(grads_f, grads_r)
    assert max(importance.values()) < 1e-9 and max(others.values()) < 1e-9
    for name in buf_r:
        torch.testing.assert_close(buf_f[name], buf_r[name], rtol=1e-9, atol=1e-12)


def test_resnet50_sn_float32_fused_against_the_float64_reference():
    """float32 fused run against the float64 reference run of the same model and input.

    Measured (SiLU activations, see below): logits 1e-7 off, gradients of convolutions, gammas and betas <= 1e-5,
    importance weights 6e-6 in the median layer and <= 8e-5 in the worst (1.1e-4 on PyTorch ops): there the float64
    gradient is a small difference of large cancelling terms, and the float32 reference path lands as far off.
    """
    model = _randomised_sn_model("resnet50v1_sn", seed=60)
    # ReLU's kink makes any float32 run's gradients jump where an output lies within rounding of 0 (one such value
    # among the model's 10^6 flips a mask and moves a layer's gradients by 1e-2): a smooth activation keeps the
    # comparison about the normalisation's numerics.
    for module in list(model.modules()):
        for child_name, child in module.named_children():
            if isinstance(child, nn.ReLU):
                setattr(module, child_name, nn.SiLU())
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(62))
    target = torch.tensor([3, 7])
    le_64, loss_64, grads_64, buf_64 = _model_results(model, x, target, "reference", torch.float64)
    le, loss, grads, buf = _model_results(model, x, target, "fused", torch.float32)
    assert _rel(le, le_64) < 1e-5
    assert abs(float(loss) - float(loss_64)) < 1e-5 * max(1.0, abs(float(loss_64)))
    importance, others = _grad_errors(grads, grads_64)
    assert max(others.values()) < 2e-5, max(others.items(), key=lambda kv: kv[1])
    assert sorted(importance.values())[len(importance) // 2] < 1e-5  # the median layer
    assert max(importance.values()) < 5e-4, max(importance.items(), key=lambda kv: kv[1])
    for name in buf_64:
        torch.testing.assert_close(buf[name].double(), buf_64[name], rtol=1e-5, atol=1e-6)


def test_trained_model_on_real_images_float32_gradients_match_float64():
    """The shipped resnet20_sn (trained by snzoo) on 64 real Fashion-MNIST test images, one training step:
    every float32 gradient of the fused path, importance weights included, within 5e-5 of float64."""
    model = snzoo.create_model("resnet20_sn", pretrained=True)
    x, target = fashion_mnist_batch(64)
    le_64, loss_64, grads_64, buf_64 = _model_results(model, x, target, "reference", torch.float64)
    le, loss, grads, buf = _model_results(model, x, target, "fused", torch.float32)
    assert _rel(le, le_64) < 1e-5
    assert abs(float(loss) - float(loss_64)) < 1e-5 * max(1.0, abs(float(loss_64)))
    importance, others = _grad_errors(grads, grads_64)
    assert len(importance) == 2 * sum(isinstance(m, SwitchNorm2d) for m in model.modules())
    assert max(others.values()) < 5e-5, max(others.items(), key=lambda kv: kv[1])
    assert max(importance.values()) < 5e-5, max(importance.items(), key=lambda kv: kv[1])
    for name in buf_64:
        torch.testing.assert_close(buf[name].double(), buf_64[name], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ compile, trace, export
def _inductor_usable() -> tuple[bool, str]:
    try:
        torch.compile(lambda t: t * 2 + 1, backend="inductor")(torch.ones(3))
        return True, ""
    except Exception as error:  # noqa: BLE001 - no C++ compiler, unsupported platform...
        return False, f"inductor cannot compile on this machine: {type(error).__name__}: {error}"


def test_torch_compile_matches_eager():
    usable, reason = _inductor_usable()
    if not usable:
        pytest.skip(reason)
    torch.manual_seed(70)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _randomise(SwitchNorm2d(8, momentum=0.8), seed=71), nn.ReLU())
    eager = copy.deepcopy(model)
    compiled = torch.compile(copy.deepcopy(model), backend="inductor")
    x = torch.randn(4, 3, 8, 8)
    with F_sn.use_implementation("fused"):
        xe, xc = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ye, yc = eager(xe), compiled(xc)
        ye.square().sum().backward()
        yc.square().sum().backward()
        torch.testing.assert_close(yc, ye, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-4, atol=1e-5)
        for (name, pe), pc in zip(eager.named_parameters(), compiled.parameters()):
            assert _rel(pc.grad, pe.grad) < 1e-4, name
        for be, bc in zip(eager.buffers(), compiled.buffers()):
            torch.testing.assert_close(bc, be, rtol=1e-5, atol=1e-6)


def test_eval_trace_is_plain_fused_formula():
    """Tracing an eval model records plain ops ending in one per-(n, c) multiply-add, no autograd.Function."""
    layer = _randomise(SwitchNorm2d(4), seed=72).eval()
    x = _input((2, 4, 5, 5), torch.float32, seed=73)
    with F_sn.use_implementation("fused"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(layer, x)
        graph = str(traced.graph)
        assert "PythonOp" not in graph and "aten::addcmul" in graph
        assert "var_mean" not in graph and "aten::div" not in graph.split("aten::addcmul")[-1]
        torch.testing.assert_close(traced(x * 2), layer(x * 2))
    y_np, _, _ = _numpy_step(layer, x)
    np.testing.assert_allclose(_np(traced(x)), y_np, **TOL32)


@pytest.mark.parametrize("kernel", [True, False])
def test_no_grad_eval_records_nothing_and_training_is_one_node(kernel, monkeypatch):
    """Without gradients nothing is recorded; in training one autograd node per layer: the kernel's C++ node (which
    takes the raw importance weights' softmax itself: its inputs are the parameters), or `_SwitchNormFunction` on
    PyTorch ops."""
    if not kernel:
        monkeypatch.setattr(cpu_kernels, "_enabled", False)
    layer = _randomise(SwitchNorm2d(4), seed=74)
    x = _input((2, 4, 3, 3), torch.float32, seed=75)
    with F_sn.use_implementation("fused"):
        with torch.no_grad():
            assert layer.eval()(x).grad_fn is None
        with torch.inference_mode():
            layer.eval()(x)
        y = layer.train()(x.requires_grad_(True))
    if kernel:
        assert y.grad_fn.name().endswith("SwitchNormFunction>")
        assert {type(f).__name__ for f, _ in y.grad_fn.next_functions if f is not None} == {"AccumulateGrad"}
    else:
        assert type(y.grad_fn).__name__ == "_SwitchNormFunctionBackward"


def test_saves_only_the_input_and_small_statistics():
    """Memory: the backward keeps x and (N, C)-sized tensors only, not full-size intermediates."""
    layer = _randomise(SwitchNorm2d(8), seed=76)
    x = _input((4, 8, 6, 6), torch.float32, seed=77).requires_grad_(True)
    saved = {"fused": [], "reference": []}
    for impl, sizes in saved.items():

        def pack(t, sizes=sizes):
            sizes.append(t.numel())
            return t

        with F_sn.use_implementation(impl), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(x)
    full = x.numel()
    assert sum(1 for s in saved["fused"] if s >= full) == 1  # x itself
    assert max(s for s in saved["fused"] if s < full) <= 3 * 4 * 8  # (terms, N, C) statistics
    assert sum(1 for s in saved["reference"] if s >= full) > 1


# ----------------------------------------------------------------------------------- the switch itself
def test_set_and_get_implementation():
    assert F_sn.get_implementation() in F_sn.IMPLEMENTATIONS
    with F_sn.use_implementation("reference"):
        assert F_sn.get_implementation() == "reference"
        with F_sn.use_implementation("fused"):
            assert F_sn.get_implementation() == "fused"
        assert F_sn.get_implementation() == "reference"
    with pytest.raises(ValueError, match="unknown switch_norm implementation"):
        F_sn.set_implementation("cuda-kernel")


def test_environment_variable_selects_the_implementation(monkeypatch):
    monkeypatch.delenv("SNZOO_SN_IMPL", raising=False)
    assert F_sn.implementation_from_environment() == "fused"
    monkeypatch.setenv("SNZOO_SN_IMPL", " Reference ")
    assert F_sn.implementation_from_environment() == "reference"
    monkeypatch.setenv("SNZOO_SN_IMPL", "")
    assert F_sn.implementation_from_environment() == "fused"
    monkeypatch.setenv("SNZOO_SN_IMPL", "fast")
    with pytest.raises(ValueError, match="SNZOO_SN_IMPL"):
        F_sn.implementation_from_environment()


def test_synchronised_statistics_and_ghost_batches_exclude_each_other():
    """(The synchronised fused path itself runs with two gloo processes in test_nn_sync.py.)"""
    layer = _randomise(SwitchNorm2d(3), seed=78)
    mean_probs, var_probs = layer.importance_weights()
    x = _input((4, 3, 2, 2), torch.float32, seed=79)
    with pytest.raises(ValueError, match="exclude each other"):
        fused.switch_norm_fused(
            x, layer.weight, layer.bias, mean_probs, var_probs, layer.running_mean, layer.running_var,
            terms=F_sn.TERMS_SN, training=True, momentum=0.9, eps=1e-5, ghost_batch_size=2, process_group="group",
        )


def test_ghost_batch_not_dividing_raises():
    layer = SwitchNorm2d(3)
    layer.ghost_batch_size = 3
    with F_sn.use_implementation("fused"), pytest.raises(ValueError, match="ghost batches of 3"):
        layer(torch.randn(4, 3, 2, 2))
