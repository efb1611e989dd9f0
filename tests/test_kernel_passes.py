"""The CPU kernel's statistics and output passes on the layouts that take their own code: rows of one pass around a
pilot value (and the rows that fall back to two), four short rows at a time, channels-innermost channel blocks of 64
values held in vector registers (C = 16, 32 or a multiple of 64) and narrow channels-innermost rows written as flat
runs. Every case against float64 on the same values, and independent of the thread count."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from snzoo.nn import SwitchNorm2d, cpu_kernels

try:  # tests/ as a package or as a plain directory on sys.path
    from . import reference_sn as ref
    from .sn_testing import TOL32_KERNEL, randomise, spread_input, terms_of, to_numpy
except ImportError:
    import reference_sn as ref
    from sn_testing import TOL32_KERNEL, randomise, spread_input, terms_of, to_numpy


pytestmark = pytest.mark.usefixtures("kernel_built")


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def _check_moments(x: torch.Tensor, rtol: float = TOL32_KERNEL["rtol"]) -> None:
    n, c = x.shape[0], x.shape[1]
    mean, var, centre = cpu_kernels.moments(x)
    var_ref, mean_ref = torch.var_mean(x.double().reshape(n, c, -1), dim=2, correction=1)
    spread = var_ref.sqrt()
    # the mean to float32 rounding of the values' spread (not of the mean itself: |mean| can dwarf it), the variance
    # relative to itself
    assert ((mean - mean_ref).abs() <= rtol * (spread + 1e-30) + 1e-12 * mean_ref.abs()).all(), \
        float(((mean - mean_ref).abs() / spread).max())
    np.testing.assert_allclose(to_numpy(var), to_numpy(var_ref), rtol=rtol, atol=0)
    assert centre.shape == (n, c)


# (N, C, H, W): short rows (2, 9, 32, 16, 255 and 49 values: whole vectors and remainders; 4 at a time, 6 rows: a
# group of two repeats its last row), one-part rows (256, 300, 784),
# rows of several parts (70 x 70); channels-innermost: blocks of 64 in registers (16, 32, 64, 128, 192 channels) and
# the general blocks (48, 3, 300)
SHAPES = [(2, 3, 1, 2), (2, 3, 3, 3), (2, 3, 4, 8), (2, 3, 4, 4), (2, 3, 5, 51), (2, 3, 16, 16), (2, 3, 7, 7),
          (3, 5, 7, 7), (2, 3, 15, 20), (2, 3, 28, 28), (1, 2, 70, 70), (2, 16, 7, 7), (2, 16, 28, 28), (3, 32, 14, 14),
          (2, 64, 7, 7), (2, 128, 9, 9), (1, 192, 5, 5), (2, 48, 7, 7), (2, 3, 9, 9), (1, 300, 4, 5)]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moments_equal_float64_on_every_layout(shape, dtype, layout):
    x = _layout(spread_input(shape, torch.float64, seed=1, mean=0.3, std=1.5).to(dtype), layout)
    _check_moments(x)


@pytest.mark.parametrize("length", [49, 300, 784, 4900])
def test_rows_whose_first_value_is_far_out_take_two_passes(length):
    """The one-pass sums around a row's first value cancel when that value lies far from the row's mean: such rows
    (an outlier first, a large mean with a tiny spread and an outlier first, a constant row) must come out as exact as
    the two-pass rows; a NaN stays NaN. Rows 0..5 of 8: the 4-row groups mix rows that fall back with rows that do
    not."""
    x = spread_input((2, 4, 1, length), torch.float64, seed=2, mean=0.0, std=1.0)
    x[0, 0, 0, 0] = 50.0  # first value 50 std out
    x[0, 1] = x[0, 1] * 1e-2 + 1e4
    x[0, 1, 0, 0] = 1e4 + 3.0  # 300 std out, on a mean of 1e4
    x[0, 2] = 7.25  # constant
    x[1, 0] = x[1, 0] * 1e-2 + 1e4  # large mean, first value typical: one pass
    x[1, 1, 0, 0] = x[1, 1].mean() + 1.9 * x[1, 1].std()  # just inside the one-pass limit
    x[1, 2, 0, 0] = x[1, 2].mean() + 2.1 * x[1, 2].std()  # just outside
    x32 = x.float()
    mean, var, _ = cpu_kernels.moments(x32)
    var_ref, mean_ref = torch.var_mean(x32.double().reshape(2, 4, -1), dim=2, correction=1)
    assert float(var[0, 2]) == 0.0 and float(mean[0, 2]) == 7.25
    np.testing.assert_allclose(to_numpy(var), to_numpy(var_ref), rtol=2e-6, atol=0)
    np.testing.assert_allclose(to_numpy(mean), to_numpy(mean_ref), rtol=1e-9, atol=1e-6)
    x32[1, 3, 0, length // 2] = float("nan")
    mean, var, _ = cpu_kernels.moments(x32)
    assert torch.isnan(mean[1, 3]) and torch.isnan(var[1, 3])
    assert torch.isfinite(var[:, :3]).all()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(5, 16, 7, 7), (3, 32, 14, 14), (2, 64, 9, 9), (2, 128, 7, 7), (7, 3, 7, 7)])
def test_passes_do_not_depend_on_the_thread_count(shape, layout):
    x = _layout(spread_input(shape, torch.float32, seed=3, mean=0.5, std=2.0), layout)
    scale, shift = (torch.randn(shape[0], shape[1], generator=torch.Generator().manual_seed(k)) for k in (4, 5))
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 3):
            torch.set_num_threads(count)
            mean, var, centre = cpu_kernels.moments(x)
            results.append((mean, var, cpu_kernels.apply_affine(x, centre, scale, shift)))
    finally:
        torch.set_num_threads(threads)
    for one, many in zip(*results):
        assert torch.equal(one, many)


@pytest.mark.parametrize("channels", [1, 3, 16, 32, 48])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_narrow_channels_last_output_equals_float64(channels, dtype):
    """Narrow channels-innermost rows are written in flat runs of several rows (49 rows: runs plus rows left over)."""
    shape = (3, channels, 7, 7)
    x = _layout(spread_input(shape, torch.float64, seed=6, mean=0.2, std=1.0).to(dtype), "channels_last")
    gen = torch.Generator().manual_seed(7)
    centre, scale, shift = (torch.randn(3, channels, generator=gen) for _ in range(3))
    y = cpu_kernels.apply_affine(x, centre, scale, shift)
    assert y.dtype == dtype and y.stride() == x.stride()
    row = lambda t: t.double().reshape(3, channels, 1, 1)  # noqa: E731
    expected = (x.double() - row(centre)) * row(scale) + row(shift)
    tol = TOL32_KERNEL if dtype == torch.float32 else dict(rtol=8e-3, atol=8e-3)
    np.testing.assert_allclose(to_numpy(y), to_numpy(expected), **tol)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("channels", [16, 64])
def test_eval_layer_on_these_layouts_equals_the_float64_reference(channels, layout):
    layer = randomise(SwitchNorm2d(channels), seed=8, buffers=True).eval()
    x = _layout(spread_input((4, channels, 14, 14), torch.float32, seed=9, mean=0.4, std=1.2), layout)
    with torch.no_grad():
        y = layer(x)
    probs = [p.detach().double().numpy() for p in layer.importance_weights()]
    expected, _, _ = ref.switch_norm(
        to_numpy(x), to_numpy(layer.weight), to_numpy(layer.bias), None, None, to_numpy(layer.running_mean),
        to_numpy(layer.running_var), training=False, eps=layer.eps, mean_probs=probs[0], var_probs=probs[1],
        terms=terms_of(layer),
    )
    np.testing.assert_allclose(to_numpy(y), expected, rtol=1e-5, atol=1e-5)
