"""The Triton passes of SN (snzoo.nn._triton_kernels), run by triton's interpreter on CPU tensors, against float64
references computed with torch: both layouts, every dtype, 1d to 3d shapes, L == 2, batch 1, several segments per
row, a large mean over a tiny spread, and their input checks."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

triton = pytest.importorskip("triton")

from snzoo.nn import _triton_kernels as tk  # noqa: E402
from snzoo.nn import cpu_kernels  # noqa: E402

HALF = (torch.bfloat16, torch.float16)
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    # triton reads TRITON_INTERPRET when it wraps a kernel and fits() when it is asked: set for these tests only
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _make(shape, layout: str, dtype, mean: float = 0.0, std: float = 1.0, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * std + mean).to(dtype)
    if layout == "contiguous":
        return x
    if x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if x.dim() == 5:
        return x.contiguous(memory_format=torch.channels_last_3d)
    return x.movedim(1, -1).contiguous().movedim(-1, 1)  # (N, C, L) with channels innermost


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.double().reshape(t.shape[0], t.shape[1], -1)


def _acc(dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _ulp(ref: torch.Tensor, dtype) -> torch.Tensor:
    """One unit in the last place of dtype at |ref| (the subnormal spacing below the smallest normal)."""
    info = torch.finfo(dtype)
    _, exponent = torch.frexp(ref.abs().clamp(min=info.tiny))
    return info.eps * torch.ldexp(torch.ones_like(ref), exponent - 1)


def _assert_rounded(out: torch.Tensor, ref: torch.Tensor, magnitude: torch.Tensor, x: torch.Tensor) -> None:
    """out (x's dtype and strides) is ref rounded once to x's dtype, after a compute-dtype evaluation whose terms
    sum to `magnitude` in absolute value (a few roundings of the compute dtype each)."""
    assert out.dtype == x.dtype and out.shape == x.shape and out.stride() == x.stride()
    bound = 0.5 * _ulp(ref, x.dtype) + 4 * torch.finfo(_acc(x.dtype)).eps * magnitude
    err = (_rows(out) - ref).abs()
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"error {worst:.3g} times the rounding bound"


def _ref_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    v = _rows(x)
    mean = v.mean(-1, keepdim=True)
    mean = mean + (v - mean).mean(-1, keepdim=True)  # two passes in float64: exact far below float32 rounding
    var = (v - mean).square().sum(-1) / (v.shape[-1] - 1)
    return mean.squeeze(-1), var


def _check_moments(x: torch.Tensor) -> torch.Tensor:
    mean, var, centre = tk.moments(x)
    ref_mean, ref_var = _ref_moments(x)
    eps = torch.finfo(_acc(x.dtype)).eps
    assert mean.dtype == var.dtype == torch.float64 and mean.shape == var.shape == ref_mean.shape
    # centred sums: the mean's error scales with the spread, not with the mean (an uncentred float32 sum of
    # mean 1e4 would be off by about the spread itself)
    spread = ref_var.sqrt()
    assert ((mean - ref_mean).abs() <= 64 * eps * spread + 1e-15 * ref_mean.abs()).all()
    # the variance to a few units of the compute dtype, plus float64 rounding times its condition number
    # |mean| / spread (the parts' means are combined as float64 values)
    condition = ref_mean.abs() / spread.clamp(min=1e-300)
    bound = (64 * eps + 16 * torch.finfo(torch.float64).eps * condition) * ref_var
    assert ((var - ref_var).abs() <= bound).all()
    assert centre.dtype == _acc(x.dtype) and torch.equal(centre, mean.to(centre.dtype))
    return centre


SHAPES = [
    pytest.param((2, 3, 50), "contiguous", id="1d-rows"),
    pytest.param((2, 3, 50), "channels_last", id="1d-channels-innermost"),
    pytest.param((2, 5, 4, 6), "contiguous", id="2d"),
    pytest.param((2, 5, 4, 6), "channels_last", id="2d-channels_last"),
    pytest.param((2, 3, 2, 3, 4), "contiguous", id="3d"),
    pytest.param((2, 3, 2, 3, 4), "channels_last", id="3d-channels_last_3d"),
    pytest.param((3, 4, 2), "contiguous", id="L2-rows"),
    pytest.param((3, 4, 1, 2), "channels_last", id="L2-channels_last"),
    pytest.param((1, 70, 3, 3), "channels_last", id="batch1-two-channel-blocks"),
    pytest.param((1, 70, 3, 3), "contiguous", id="batch1-rows"),
    pytest.param((2, 3, 3000), "contiguous", id="tiles-combined-rows"),  # several tiles in one program
    pytest.param((2, 5, 40, 30), "channels_last", id="tiles-combined-channels_last"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", SHAPES)
def test_all_passes_match_float64_reference(shape, layout, dtype):
    x = _make(shape, layout, dtype, mean=0.5, seed=1)
    assert tk.fits(x)
    centre = _check_moments(x)
    n, c = shape[:2]
    gen = torch.Generator().manual_seed(2)
    a, b, shift = (torch.randn(n, c, generator=gen, dtype=torch.float64).to(centre.dtype) for _ in range(3))
    g = _make(shape, layout, dtype, seed=3)
    xc = _rows(x) - centre.double()[..., None]
    a64, b64, s64 = (t.double()[..., None] for t in (a, b, shift))

    y = tk.apply_affine(x, centre, b, shift)
    _assert_rounded(y, xc * b64 + s64, (xc * b64).abs() + s64.abs(), x)

    g64 = _rows(g)
    sum_g, sum_gd = tk.grad_sums(g, x, centre)
    assert sum_g.dtype == sum_gd.dtype == torch.float64 and sum_g.shape == (n, c)
    eps = torch.finfo(_acc(dtype)).eps
    assert ((sum_g - g64.sum(-1)).abs() <= 16 * eps * g64.abs().sum(-1)).all()
    assert ((sum_gd - (g64 * xc).sum(-1)).abs() <= 16 * eps * (g64 * xc).abs().sum(-1)).all()

    dx = tk.grad_input(g, x, centre, a, b, shift)
    _assert_rounded(dx, g64 * a64 + xc * b64 + s64, (g64 * a64).abs() + (xc * b64).abs() + s64.abs(), x)


@pytest.mark.parametrize("shape,layout", [
    pytest.param((1, 2, 40000), "contiguous", id="rows"),
    pytest.param((1, 3, 100, 100), "channels_last", id="channels_last"),
])
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
def test_large_mean_tiny_spread_over_several_segments(shape, layout, dtype):
    # mean 1e4, std 1e-2: the spread sits in the last few bits of float32; each row takes several programs whose
    # moments are combined on the host
    x = _make(shape, layout, dtype, mean=1e4, std=1e-2, seed=4)
    assert tk._reduction_plan(tk._view(x, "test")).segments > 1
    centre = _check_moments(x)
    g = _make(shape, layout, dtype, seed=5)
    sum_g, sum_gd = tk.grad_sums(g, x, centre)
    g64, xc = _rows(g), _rows(x) - centre.double()[..., None]
    eps = torch.finfo(_acc(dtype)).eps
    assert ((sum_g - g64.sum(-1)).abs() <= 16 * eps * g64.abs().sum(-1)).all()
    assert ((sum_gd - (g64 * xc).sum(-1)).abs() <= 16 * eps * (g64 * xc).abs().sum(-1)).all()
    ones = torch.ones(shape[:2], dtype=centre.dtype)
    y = tk.apply_affine(x, centre, ones * 100, ones * 0)  # (x - centre) * 100: the centred values, exactly
    _assert_rounded(y, xc * 100, xc.abs() * 100, x)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_precision_over_several_segments(dtype):
    x = _make((1, 3, 100, 100), "channels_last", dtype, mean=3.0, seed=6)
    centre = _check_moments(x)
    ones = torch.ones(1, 3, dtype=torch.float32)
    y = tk.apply_affine(x, centre, ones * 0.7, ones * 0.1)
    xc = _rows(x) - centre.double()[..., None]
    _assert_rounded(y, xc * 0.7 + 0.1, xc.abs() * 0.7 + 0.1, x)


def test_matches_the_cpu_kernel_to_float32_rounding():
    if not cpu_kernels.library_path().exists() or not cpu_kernels.available():
        pytest.skip("the SN CPU kernel is not built here (snzoo build-kernel)")
    x = _make((2, 6, 5, 7), "channels_last", torch.bfloat16, mean=2.0, seed=7)
    mean, var, centre = tk.moments(x)
    mean_k, var_k, centre_k = cpu_kernels.moments(x)
    torch.testing.assert_close(mean, mean_k, rtol=0, atol=1e-6)  # spread about 1
    torch.testing.assert_close(var, var_k, rtol=1e-5, atol=0)
    assert centre.dtype == centre_k.dtype
    g = _make((2, 6, 5, 7), "channels_last", torch.bfloat16, seed=8)
    for got, want in zip(tk.grad_sums(g, x, centre_k), cpu_kernels.grad_sums(g, x, centre_k)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_fits_takes_what_the_cpu_kernel_takes_on_its_device(monkeypatch):
    x = torch.randn(2, 3, 4, 5)
    assert tk.fits(x) and tk.fits(x.contiguous(memory_format=torch.channels_last))
    assert not tk.fits(x[..., ::2])  # not dense
    assert not tk.fits(x.transpose(2, 3))  # dense, but neither (N, C, L) nor (N, L, C)
    assert not tk.fits(x[:, :, :1, :1])  # one value per (sample, channel)
    assert not tk.fits(x.to(torch.int32)) and not tk.fits(x[0, 0])  # integers; (N, C) only
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not tk.fits(x)  # CPU tensors only run in the interpreter


def test_bad_input_raises_one_clear_error():
    x = torch.randn(2, 3, 8)
    centre = torch.zeros(2, 3)
    with pytest.raises(tk.KernelInputError, match="check fits"):
        tk.moments(x[..., ::2])
    with pytest.raises(tk.KernelInputError, match="g must have x's shape, strides"):
        tk.grad_sums(x.movedim(1, -1).contiguous().movedim(-1, 1), x, centre)
    with pytest.raises(tk.KernelInputError, match=r"centre must be a contiguous \(2, 3\) torch.float32"):
        tk.apply_affine(x, centre.double(), centre, centre)
    with pytest.raises(tk.KernelInputError, match=r"c must be a contiguous"):
        tk.grad_input(x, x, centre, centre, centre, torch.zeros(3, 2).t())


def test_enabled_only_when_asked(monkeypatch):
    monkeypatch.delenv("SNZOO_TRITON", raising=False)
    assert not tk.enabled()
    monkeypatch.setenv("SNZOO_TRITON", "1")
    assert tk.enabled()


def test_importing_and_asking_needs_no_triton():
    code = textwrap.dedent("""
        import os, sys
        sys.modules["triton"] = None  # as where triton is not installed
        os.environ["SNZOO_TRITON"] = "1"
        import torch
        from snzoo.nn import _triton_kernels as tk
        assert not tk.enabled()
        assert not tk.fits(torch.randn(2, 3, 4))
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]
