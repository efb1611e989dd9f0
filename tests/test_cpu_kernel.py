"""The compiled CPU kernel of SN (snzoo/nn/csrc, loaded by snzoo.nn.cpu_kernels): the whole-layer operator in eval
and training and its full-size passes, against float64 references, on both of its schedules, on stress inputs, across
thread counts, on a shipped model with real images, and its fallback when it cannot be built."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import snzoo
from snzoo.nn import SparseSwitchNorm2d, SwitchNorm1d, SwitchNorm2d, SwitchNorm3d, cpu_kernels
from snzoo.nn.functional import use_implementation
from snzoo_cli.main import cli

try:  # tests/ as a package or as a plain directory on sys.path
    from . import reference_sn as ref
    from .sn_testing import TOL32_KERNEL, TOL64, fashion_mnist_batch, randomise, spread_input, terms_of, to_numpy
except ImportError:
    import reference_sn as ref
    from sn_testing import TOL32_KERNEL, TOL64, fashion_mnist_batch, randomise, spread_input, terms_of, to_numpy


pytestmark = pytest.mark.usefixtures("kernel_built")


def _reference(layer, x: torch.Tensor) -> np.ndarray:
    """The float64 NumPy reference of eval-mode `layer` on x."""
    terms = terms_of(layer)
    probs = [p.detach().double().numpy() for p in layer.importance_weights()]  # as the layer rounds them
    y, _, _ = ref.switch_norm(
        to_numpy(x), to_numpy(layer.weight), to_numpy(layer.bias), None, None,
        to_numpy(layer.running_mean) if layer.using_bn else None,
        to_numpy(layer.running_var) if layer.using_bn else None,
        training=False, eps=layer.eps, mean_probs=probs[0], var_probs=probs[1], terms=terms,
    )
    return y


def _kernel(layer, x: torch.Tensor) -> torch.Tensor:
    """The whole-layer operator in eval mode, without gradients."""
    mean_probs, var_probs = layer.importance_weights()
    rm = layer.running_mean if layer.using_bn else None
    rv = layer.running_var if layer.using_bn else None
    with torch.no_grad():
        return cpu_kernels.switch_norm(x, layer.weight, layer.bias, mean_probs, var_probs,
                                       cpu_kernels.term_slots(terms_of(layer)), x.shape[0], rm, rv, False,
                                       layer.momentum, True, layer.eps)


LAYERS = {
    "sn": (lambda: SwitchNorm2d(6), (3, 6, 5, 7)),
    "sn_no_bn": (lambda: SwitchNorm2d(6, using_bn=False), (3, 6, 5, 7)),
    "sn1d_ncl": (lambda: SwitchNorm1d(6), (3, 6, 9)),  # LN and BN terms only
    "sn3d": (lambda: SwitchNorm3d(6), (3, 6, 2, 3, 4)),
    "ssn": (lambda: SparseSwitchNorm2d(6), (3, 6, 5, 7)),  # sparsestmax probabilities (some exactly 0)
    "two_values": (lambda: SwitchNorm2d(5), (4, 5, 1, 2)),
    "batch_one": (lambda: SwitchNorm2d(3), (1, 3, 4, 4)),
    "one_channel": (lambda: SwitchNorm2d(1), (2, 1, 3, 3)),
    # one sample's rows above 1 MiB: the kernel goes sample by sample
    "sample_by_sample": (lambda: SwitchNorm2d(16), (2, 16, 128, 128)),
}


# half-precision output against float64: the output's own rounding (2^-8 of |y| in bfloat16, 2^-11 in float16)
TOL_BF16 = dict(rtol=8e-3, atol=8e-3)
TOL_F16 = dict(rtol=1e-3, atol=1e-3)
DTYPES = [(torch.float64, TOL64), (torch.float32, TOL32_KERNEL), (torch.bfloat16, TOL_BF16), (torch.float16, TOL_F16)]


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """x with its channels innermost (channels_last for 4-D, channels_last_3d for 5-D, the moved view for 3-D)."""
    if x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if x.dim() == 5:
        return x.contiguous(memory_format=torch.channels_last_3d)
    return x.transpose(1, 2).contiguous().transpose(1, 2)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("kind", sorted(LAYERS))
@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_kernel_equals_the_float64_reference(kind, dtype, tol, layout):
    """Every layer kind, dtype and layout; half-precision x with float32 parameters, as under autocast."""
    make, shape = LAYERS[kind]
    layer = randomise(make(), seed=3, buffers=True).to(dtype if dtype in (torch.float64, torch.float32) else torch.float32)
    layer.eval()
    x = spread_input(shape, torch.float64, seed=4).to(dtype)
    if layout == "channels_last":
        x = _channels_last(x)
    y = _kernel(layer, x)
    assert y.dtype == dtype and y.shape == x.shape and y.stride() == x.stride()
    np.testing.assert_allclose(to_numpy(y), _reference(layer, x), **tol)


def _reference_two_pass(layer, x: torch.Tensor) -> np.ndarray:
    """SN in float64 from the equations in their cancellation-free form (variances of centred values; the LN
    variance as mean(var_in) + mean((mean_in - mean_ln)^2)), with the layer's own probabilities. NumPy's reference
    uses E[x^2] - mean^2 for the LN variance, as the original does, which cancels at mean 1e4 even in float64."""
    x = x.double()
    mean_in, var_in = x.mean((2, 3), keepdim=True), x.var((2, 3), keepdim=True)
    mean_ln = mean_in.mean(1, keepdim=True)
    var_ln = (var_in + (mean_in - mean_ln) ** 2).mean(1, keepdim=True)
    rm, rv = (b.detach().double().reshape(1, -1, 1, 1) for b in (layer.running_mean, layer.running_var))
    pm, pv = (p.detach().double() for p in layer.importance_weights())
    mu = pm[0] * mean_in + pm[1] * mean_ln + pm[2] * rm
    sigma2 = pv[0] * var_in + pv[1] * var_ln + pv[2] * rv
    w, b = (p.detach().double().reshape(1, -1, 1, 1) for p in (layer.weight, layer.bias))
    return ((x - mu) / (sigma2 + layer.eps).sqrt() * w + b).numpy()


# mean / std = 1e6 scales the dtype's rounding: ~1e-16 * 1e6 * |y| (~40) in float64
@pytest.mark.parametrize("dtype,tol", [(torch.float64, dict(rtol=1e-9, atol=1e-8)), (torch.float32, dict(rtol=1e-5, atol=1e-5))])
@pytest.mark.parametrize("shape", [(2, 4, 6, 6), (2, 16, 128, 128)])
def test_kernel_keeps_precision_when_the_mean_dwarfs_the_spread(dtype, tol, shape):
    """mean 1e4, std 1e-2: the centred output (x - m) * a + b' keeps what x * a + b would lose to cancellation,
    and the statistics' second pass recovers the rounding of the first mean (a float32 sum of 16384 values near
    1e4 is ~3e-4 off). Both sides see the same values of x (float32: rounded to 1e4 * 6e-8, 6% of the std)."""
    layer = randomise(SwitchNorm2d(shape[1]), seed=5, buffers=True).to(dtype).eval()
    with torch.no_grad():  # running statistics of the same scale, so that the BN term is sane too
        layer.running_mean.add_(1e4)
        layer.running_var.mul_(1e-4)
    x = spread_input(shape, dtype, seed=6, mean=1e4, std=1e-2)
    np.testing.assert_allclose(to_numpy(_kernel(layer, x)), _reference_two_pass(layer, x), **tol)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_kernel_output_does_not_depend_on_the_thread_count(layout):
    """1 thread takes the samples one per task (4 samples >= 2 per thread), 4 threads split each sample's passes
    over the threads: the same values either way."""
    layer = randomise(SwitchNorm2d(32), seed=7, buffers=True).eval()
    x = _op_input((4, 32, 40, 40), torch.float32, 8, layout)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _kernel(layer, x)
        torch.set_num_threads(4)
        many = _kernel(layer, x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


def test_kernel_rejects_what_it_does_not_cover():
    x = torch.randn(2, 3, 4, 4)
    w, b, p = torch.ones(3), torch.zeros(3), torch.full((3,), 1 / 3)
    rm, rv = torch.zeros(3), torch.ones(3)

    def layer(x, w=w, slots=(0, 1, 2), group=2, running=(rm, rv), training=False):
        return torch.ops.snzoo.switch_norm(x, w, b, p, p, list(slots), group, *running, training, 0.9, True, 1e-5)

    with pytest.raises(RuntimeError, match="contiguous or channels_last"):
        layer(x[:, :, :, ::2])
    with pytest.raises(RuntimeError, match="at least 2 values"):
        layer(x[:, :, :1, :1].contiguous())
    with pytest.raises(RuntimeError, match="weight must have 3 values, not 4"):
        layer(x, w=torch.ones(4))
    with pytest.raises(RuntimeError, match=r"terms are 0 \(IN\), 1 \(LN\) or 2 \(BN\)"):
        layer(x, slots=(0, 1, 3))
    with pytest.raises(RuntimeError, match="does not split into groups of 3"):
        layer(x, group=3, training=True)
    with pytest.raises(RuntimeError, match="needs the running buffers"):
        layer(x, running=(None, None))
    with pytest.raises(RuntimeError, match="x's shape, strides and dtype"):
        torch.ops.snzoo.sn_grad_sums(x.to(memory_format=torch.channels_last), x, torch.zeros(2, 3))
    with pytest.raises(RuntimeError, match="compute dtype"):
        torch.ops.snzoo.sn_apply(x, torch.zeros(2, 3, dtype=torch.float64), torch.ones(2, 3), torch.zeros(2, 3))


# ----------------------------------------------------------------------------- the training passes
# Shapes for the ops behind training: several chunks of 2048 values per row (L = 4160), more channels than one block
# of rows holds on (N, L, C), one channel, two values, batch one, 1-d and 3-d inputs.
OP_SHAPES = [(2, 3, 64, 65), (2, 2, 17, 19), (3, 5, 7, 9), (2, 300, 3, 5), (4, 1, 6, 6), (2, 4, 1, 2), (1, 8, 5, 5), (3, 6, 9),
             (2, 3, 4, 5, 6)]


def _op_input(shape, dtype, seed, layout, mean=0.3, std=1.0):
    x = spread_input(shape, torch.float64, seed=seed, mean=mean, std=std).to(dtype)
    return _channels_last(x) if layout == "channels_last" else x


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", OP_SHAPES)
@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_training_passes_equal_float64_on_the_same_values(shape, dtype, tol, layout):
    """sn_moments, sn_apply, sn_grad_sums and sn_grad_input against float64 on the same (rounded) inputs: the
    statistics to float32 accumulation (any dtype: half values are summed in float32), the outputs to their dtype."""
    x = _op_input(shape, dtype, 20, layout)
    g = _op_input(shape, dtype, 21, layout)
    n, c = shape[0], shape[1]
    x64, g64 = x.double().reshape(n, c, -1), g.double().reshape(n, c, -1)
    mean, var, centre = cpu_kernels.moments(x)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert mean.dtype == var.dtype == torch.float64 and centre.dtype == acc and mean.shape == (n, c)
    var_ref, mean_ref = torch.var_mean(x64, dim=2, correction=1)
    stats_tol = TOL64 if dtype == torch.float64 else TOL32_KERNEL
    np.testing.assert_allclose(to_numpy(mean), to_numpy(mean_ref), **stats_tol)
    np.testing.assert_allclose(to_numpy(var), to_numpy(var_ref), **stats_tol)
    np.testing.assert_allclose(to_numpy(centre), to_numpy(mean_ref), **stats_tol)

    gen = torch.Generator().manual_seed(22)
    scale, shift, b, c_coef = (torch.randn(n, c, generator=gen, dtype=torch.float64).to(acc) for _ in range(4))
    row = lambda t: t.double().reshape(n, c, 1)  # noqa: E731
    y = cpu_kernels.apply_affine(x, centre, scale, shift)
    assert y.dtype == dtype and y.stride() == x.stride()
    y_ref = (x64 - row(centre)) * row(scale) + row(shift)
    np.testing.assert_allclose(to_numpy(y).reshape(n, c, -1), to_numpy(y_ref), **tol)

    sum_g, sum_gd = cpu_kernels.grad_sums(g, x, centre)
    # sums that cancel are as accurate as float32 accumulation of their terms: tolerance relative to sum |term|
    for got, terms in ((sum_g, g64), (sum_gd, g64 * (x64 - row(centre)))):
        bound = stats_tol["atol"] * (1 + terms.abs().sum(2))
        assert ((got - terms.sum(2)).abs() <= bound).all(), float((got - terms.sum(2)).abs().max())

    dx = cpu_kernels.grad_input(g, x, centre, scale, b, c_coef)
    assert dx.dtype == dtype and dx.stride() == x.stride()
    dx_ref = g64 * row(scale) + (x64 - row(centre)) * row(b) + row(c_coef)
    np.testing.assert_allclose(to_numpy(dx).reshape(n, c, -1), to_numpy(dx_ref), **tol)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_moments_keep_precision_when_the_mean_dwarfs_the_spread(dtype, layout):
    """mean 1e4, std 1e-2 over rows of several chunks: each chunk's centred second pass and the exact combination
    of chunks leave the variance as accurate as float32 accumulation allows (a plain sum of squares would lose it
    all: 1e8 against 1e-4)."""
    x = _op_input((2, 3, 64, 65), dtype, 23, layout, mean=1e4, std=1e-2)
    mean, var, _ = cpu_kernels.moments(x)
    var_ref, mean_ref = torch.var_mean(x.double().reshape(2, 3, -1), dim=2, correction=1)
    np.testing.assert_allclose(to_numpy(mean), to_numpy(mean_ref), rtol=1e-9, atol=0)
    np.testing.assert_allclose(to_numpy(var), to_numpy(var_ref), rtol=1e-4, atol=0)


def test_bfloat16_output_rounds_to_nearest_even_like_torch():
    """sn_apply writes bfloat16 as torch rounds float32 (to nearest, ties to even; inf and NaN kept): with scale 1
    and centre 0 the kernel's float32 value is x + shift exactly, so the results must be equal bit for bit."""
    x = torch.tensor([1.0, 1.0078125, -1.0, 3.0, float("inf"), float("nan"), 0.0, 1e-3], dtype=torch.bfloat16)
    shift = torch.tensor([2.0**-8, 2.0**-8, -(2.0**-8), 0.0123, 1.0, 1.0, -0.0, 3e-6])
    x = x.reshape(1, 8, 1).expand(1, 8, 2).contiguous()
    y = cpu_kernels.apply_affine(x, torch.zeros(1, 8), torch.ones(1, 8), shift.reshape(1, 8))
    expected = (x.float() + shift.reshape(1, 8, 1)).to(torch.bfloat16)
    nan = expected.isnan()
    assert torch.equal(y.isnan(), nan)  # a NaN stays NaN (its payload bits are not specified)
    assert torch.equal(y[~nan].view(torch.int16), expected[~nan].view(torch.int16))
    assert y[0, 0, 0] == 1.0 and y[0, 1, 0] == 1.015625  # the two ties went to the even neighbour
    g = spread_input((4, 16, 9, 9), torch.float64, seed=24).to(torch.bfloat16)
    y = cpu_kernels.apply_affine(g, torch.zeros(4, 16), torch.ones(4, 16), torch.full((4, 16), 1.7))
    assert torch.equal(y, (g.float() + 1.7).to(torch.bfloat16))


def test_training_passes_do_not_depend_on_the_thread_count():
    threads = torch.get_num_threads()
    results = []
    for layout in ("contiguous", "channels_last"):
        x = _op_input((4, 32, 40, 40), torch.float32, 25, layout)
        try:
            for count in (1, max(2, threads)):
                torch.set_num_threads(count)
                results.append((layout, count, cpu_kernels.moments(x), cpu_kernels.grad_sums(x, x, torch.zeros(4, 32))))
        finally:
            torch.set_num_threads(threads)
    for (_, _, m1, s1), (_, _, m2, s2) in zip(results[::2], results[1::2]):
        assert all(torch.equal(a, b) for a, b in zip(m1 + s1, m2 + s2))


# half-precision training against float64 on the same values: the output's rounding, and gradients a few of the
# dtype's units of the largest gradient (dx sums g * a and two (N, C) terms, each rounded to the dtype once)
TRAIN_TOL = {torch.float32: (2e-6, 2e-6), torch.bfloat16: (1.6e-2, 4 * 2**-8), torch.float16: (2e-3, 4 * 2**-11)}


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ghost", [None, 3])
def test_a_training_layer_is_one_kernel_call_in_every_dtype_and_layout(dtype, layout, ghost, monkeypatch):
    """A training step of SwitchNorm2d (float32 parameters, as under autocast) is one call of the whole-layer
    operator, whose C++ backward comes with it; x is read as it is (no upcast copy, no change of layout), y and dx
    come back in x's dtype and layout, and y, dx, the parameter gradients and the running buffers equal the float64
    reference on the same values. With the kernel switched off it is not called."""
    calls: list[tuple] = []
    whole_layer = cpu_kernels.switch_norm
    monkeypatch.setattr(cpu_kernels, "switch_norm",
                        lambda x, *a, **kw: calls.append((x.dtype, x.stride())) or whole_layer(x, *a, **kw))
    base = randomise(SwitchNorm2d(6), seed=26, buffers=True).train()
    base.ghost_batch_size = ghost
    x_values = _op_input((6, 6, 5, 7), dtype, 27, layout)
    g = _op_input((6, 6, 5, 7), dtype, 28, layout)
    results = {}
    for run in ("kernel", "pytorch", "float64"):
        calls.clear()
        layer = copy.deepcopy(base).double() if run == "float64" else copy.deepcopy(base)
        x = (x_values.double() if run == "float64" else x_values.clone()).requires_grad_(True)
        impl = "reference" if run == "float64" else "fused"
        with use_implementation(impl), cpu_kernels.use_kernel(run == "kernel"):
            y = layer(x)
            y.backward(g.to(y.dtype))
        assert calls == ([(dtype, x.stride())] if run == "kernel" else [])
        if run != "float64":
            assert y.dtype == dtype and y.stride() == x.stride() and x.grad.stride() == x.stride()
        results[run] = [y, x.grad, layer.weight.grad, layer.bias.grad, layer.mean_weight.grad, layer.var_weight.grad,
                        layer.running_mean, layer.running_var]
    rtol, atol = TRAIN_TOL[dtype]
    names = ["y", "dx", "dweight", "dbias", "dmean_weight", "dvar_weight", "running_mean", "running_var"]
    for name, got, want in zip(names, results["kernel"], results["float64"]):
        scale = float(want.detach().abs().max())
        err = float((got.detach().double() - want.detach()).abs().max())
        assert err <= atol * scale + rtol * scale, (name, err, scale)


def test_shipped_model_on_real_images_is_the_same_with_and_without_the_kernel():
    """The shipped resnet20_sn on 64 real Fashion-MNIST test images: the kernel's float32 logits are those of the
    float64 reference formulation, as close as PyTorch ops' float32 logits are, with the same predictions."""
    model = snzoo.create_model("resnet20_sn", pretrained=True).eval()
    x, _ = fashion_mnist_batch(64)
    with torch.no_grad():
        with_kernel = model(x)
        with use_implementation("reference"):
            reference = copy.deepcopy(model).double()(x.double())
        with cpu_kernels.use_kernel(False):
            without = model(x)
    scale = float(reference.abs().max())
    assert float((with_kernel.double() - reference).abs().max()) < 1e-5 * scale
    assert float((without.double() - reference).abs().max()) < 1e-5 * scale
    assert torch.equal(with_kernel.argmax(1), reference.argmax(1))


def test_use_kernel_switches_the_eval_path_inside_its_block(monkeypatch):
    calls = []
    kernel = cpu_kernels.switch_norm
    monkeypatch.setattr(cpu_kernels, "switch_norm", lambda *args, **kw: calls.append(1) or kernel(*args, **kw))
    layer = randomise(SwitchNorm2d(4), seed=9, buffers=True).eval()
    x = spread_input((2, 4, 5, 5), torch.float32, seed=10)
    with torch.no_grad():
        on = layer(x)
        with cpu_kernels.use_kernel(False):
            assert not cpu_kernels.active()
            off = layer(x)
        assert cpu_kernels.active()
        layer(x)
    assert len(calls) == 2
    torch.testing.assert_close(on, off, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------ building, caching, falling back
_PROBE = textwrap.dedent("""
    import warnings
    import torch
    from snzoo.nn import SwitchNorm2d, cpu_kernels
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = cpu_kernels.available()
    layer = SwitchNorm2d(3).eval()
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4).sin()
    with torch.no_grad():
        y = layer(x)
    mean = x.mean((2, 3), keepdim=True)
    var = x.var((2, 3), keepdim=True)
    ln_mean = mean.mean(1, keepdim=True)
    ln_var = (var + mean ** 2).mean(1, keepdim=True) - ln_mean ** 2
    expected = (x - (mean + ln_mean) / 3) / ((var + ln_var) / 3 + 1e-5).sqrt()  # running buffers start at 0
    print("LOADED", loaded, "MATCH", bool(torch.allclose(y, expected, atol=1e-5)))
    print("WARNINGS", " | ".join(str(w.message) for w in caught))
""")


def _probe(env_changes: dict) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_changes}
    return subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=300)


def test_a_failed_build_falls_back_with_one_warning_and_leaves_nothing(tmp_path):
    cache = tmp_path / "cache"
    result = _probe({"SNZOO_KERNEL_CACHE": str(cache), "CXX": str(tmp_path / "no-such-compiler")})
    assert result.returncode == 0, result.stderr
    assert "LOADED False MATCH True" in result.stdout
    warning = result.stdout.split("WARNINGS", 1)[1]
    assert warning.count("could not build the SN CPU kernel") == 1 and "SNZOO_CPU_KERNEL=0" in warning
    assert list(cache.iterdir()) == []


def test_disabled_kernel_is_neither_built_nor_loaded(tmp_path):
    cache = tmp_path / "cache"
    result = _probe({"SNZOO_CPU_KERNEL": "0", "SNZOO_KERNEL_CACHE": str(cache)})
    assert result.returncode == 0, result.stderr
    assert "LOADED False MATCH True" in result.stdout and "WARNINGS \n" in result.stdout
    assert not cache.exists()


def test_the_kernel_is_built_once_then_loaded_from_the_cache(tmp_path):
    cache = tmp_path / "cache"
    first = _probe({"SNZOO_KERNEL_CACHE": str(cache)})
    assert first.returncode == 0, first.stderr
    assert "LOADED True MATCH True" in first.stdout and "building the SN CPU kernel once" in first.stderr
    name = cpu_kernels.build_name()
    assert [p.name for p in cache.iterdir()] == [name]  # no staging folder left behind
    library = cache / name / f"{name}.so"
    assert library.is_file()
    second = _probe({"SNZOO_KERNEL_CACHE": str(cache)})
    assert "LOADED True MATCH True" in second.stdout and "building" not in second.stderr
    # a damaged library (say, a disk that filled up) fails its checksum: built again, never mapped
    library.write_bytes(library.read_bytes()[:4096])
    third = _probe({"SNZOO_KERNEL_CACHE": str(cache)})
    assert "LOADED True MATCH True" in third.stdout and "building the SN CPU kernel once" in third.stderr
    assert [p.name for p in cache.iterdir()] == [name] and library.stat().st_size > 4096


def test_the_build_name_follows_the_source(monkeypatch, tmp_path):
    """A changed kernel source (or flags, torch, CPU) gets a new build, never a stale library."""
    name = cpu_kernels.build_name()
    changed = tmp_path / "switch_norm_cpu.cpp"
    changed.write_bytes(cpu_kernels.SOURCE.read_bytes() + b"\n// changed\n")
    for header in cpu_kernels.HEADERS:
        (tmp_path / header).write_bytes(cpu_kernels.SOURCE.with_name(header).read_bytes())
    monkeypatch.setattr(cpu_kernels, "SOURCE", changed)
    changed_name = cpu_kernels.build_name()
    assert changed_name != name and changed_name.startswith("snzoo_cpu_")
    header = tmp_path / cpu_kernels.HEADERS[0]
    header.write_bytes(header.read_bytes() + b"\n// changed\n")
    header_name = cpu_kernels.build_name()
    assert header_name not in (name, changed_name)
    changed_name = header_name
    monkeypatch.setattr(cpu_kernels, "CFLAGS", (*cpu_kernels.CFLAGS, "-DSNZOO_CHANGED"))
    assert cpu_kernels.build_name() not in (name, changed_name)
    assert cpu_kernels.library_path() == cpu_kernels.cache_dir() / cpu_kernels.build_name() / (
        cpu_kernels.build_name() + ".so")


def test_the_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SNZOO_KERNEL_CACHE", str(tmp_path / "kernel-cache"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cpu_kernels.cache_dir() == tmp_path / "kernel-cache"
    monkeypatch.delenv("SNZOO_KERNEL_CACHE")
    assert cpu_kernels.cache_dir() == tmp_path / "xdg" / "snzoo" / "kernels"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cpu_kernels.cache_dir() == tmp_path / "home" / ".cache" / "snzoo" / "kernels"


# ------------------------------------------------------------------------------------------ snzoo build-kernel
def test_build_kernel_command_prints_the_library():
    result = CliRunner().invoke(cli, ["build-kernel"])
    assert result.exit_code == 0, result.output
    assert result.output == f"SN CPU kernel: {cpu_kernels.library_path()}\n"
    assert cpu_kernels.library_path().is_file()


def test_build_kernel_command_switched_off_is_one_line_error(monkeypatch):
    monkeypatch.setenv("SNZOO_CPU_KERNEL", "0")
    result = CliRunner().invoke(cli, ["build-kernel"])
    assert result.exit_code == 1
    assert result.output == "error: the SN CPU kernel is switched off by SNZOO_CPU_KERNEL=0; unset it to build the kernel\n"


def test_build_kernel_command_without_a_compiler_says_why_and_leaves_nothing(tmp_path):
    cache = tmp_path / "cache"
    env = {**os.environ, "SNZOO_KERNEL_CACHE": str(cache), "CXX": str(tmp_path / "no-such-compiler")}
    result = subprocess.run([sys.executable, "-m", "snzoo", "build-kernel"], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 1 and result.stdout == ""
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: could not build the SN CPU kernel") and "no-such-compiler: not found" in last
    assert "apt-get install g++" in last and list(cache.iterdir()) == []


def test_a_missing_kernel_source_is_one_clear_error(monkeypatch, tmp_path):
    """An install without snzoo/nn/csrc (a broken package): `snzoo build-kernel` says so in one line, no traceback."""
    monkeypatch.setattr(cpu_kernels, "SOURCE", tmp_path / "csrc" / "switch_norm_cpu.cpp")
    with pytest.raises(snzoo.errors.KernelBuildError, match="source .* is missing; reinstall snzoo"):
        cpu_kernels.build()
    result = CliRunner().invoke(cli, ["build-kernel"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the SN CPU kernel's source") and "Traceback" not in result.output


# ------------------------------------------------------------------------------------------ torch.compile
def test_the_layer_operator_compiles_as_one_node_with_its_backward_and_buffer_update():
    """torch.compile (fullgraph, inductor) traces the whole-layer operator through its fake implementations: the
    compiled loss, every gradient and the running buffers' in-place update equal eager's."""

    def loss_of(x, w, b, mw, vw, rm, rv):
        y = cpu_kernels.switch_norm(x, w, b, torch.softmax(mw, 0), torch.softmax(vw, 0), [0, 1, 2], 2, rm, rv, True,
                                    0.9, True, 1e-5)
        return (y * y.detach().sin()).sum()

    g = torch.Generator().manual_seed(50)
    inputs = [torch.randn(4, 3, 5, 5, generator=g), torch.rand(1, 3, 1, 1, generator=g) + 0.5,
              torch.randn(1, 3, 1, 1, generator=g), torch.randn(3, generator=g), torch.randn(3, generator=g)]
    results = []
    for fn in (loss_of, torch.compile(loss_of, fullgraph=True, backend="inductor")):
        leaves = [t.clone().requires_grad_(True) for t in inputs]
        buffers = [torch.zeros(1, 3, 1), torch.ones(1, 3, 1)]
        loss = fn(*leaves, *buffers)
        loss.backward()
        results.append([loss.detach(), *(t.grad for t in leaves), *buffers])
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    assert not torch.equal(results[1][-2], torch.zeros(1, 3, 1))  # the buffer update happened in the compiled run
