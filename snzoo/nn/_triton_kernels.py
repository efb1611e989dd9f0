"""Triton kernels for the full-size passes of switchable normalisation on CUDA tensors: the passes of
`snzoo.nn.cpu_kernels` (`moments`, `apply_affine`, `grad_sums`, `grad_input`) with the same signatures and results.

x is viewed without a copy as (N, C, L) rows (contiguous input) or as (N, L, C) (channels innermost: channels_last and
channels_last_3d), L >= 2, in float32, float64, bfloat16 or float16. Half-precision values are read and written in
their own dtype and computed in float32; float64 is computed in float64.

Every kernel works on tiles of (BLOCK_C channels) x (BLOCK_L positions) of one sample, the tile's fast axis along
memory (L for rows, C for channels innermost), so loads coalesce in both layouts. The reductions give each program a
segment of positions of one channel block: per tile, sums in the compute dtype (the moments centred on the tile's own
mean, so that a large mean costs no precision), accumulated across tiles in float64 (Chan's formula for the
moments); the few segments of a row are combined exactly in float64 by torch ops on (N, C, segments) tensors.
Tile and segment sizes depend on the shape only, never on the device, so results are the same on every GPU.

Opt-in: `enabled()` is True only where triton imports and SNZOO_TRITON=1. triton is imported on first use (importing
snzoo never needs it). With TRITON_INTERPRET=1 the kernels also run, slowly, on CPU tensors (tests do that).

Differences from `cpu_kernels`: the partial sums are grouped differently (tiles of up to 2048 values reduced as
trees, not sequential chunks), so results agree with it to float32 rounding, not bit for bit; tensors they cannot
take raise KernelInputError (a ValueError) where the CPU kernel raises RuntimeError, and the (N, C) operands must be
on x's device too.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Any, NamedTuple, Optional

import torch
from torch import Tensor

from snzoo._io import env_flag
from snzoo.errors import KernelInputError

tl: Any = None  # triton.language, bound by _kernels(); the kernels below read it as a global when compiled

_TILE = 2048  # values per tile, summed in the compute dtype before a float64 accumulation
_CHANNEL_BLOCK = 64  # channels per tile when channels are innermost (256 contiguous bytes in float32)
_SEGMENT = 16384  # values a reduction program handles, at most (whole tiles)
_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

_lock = threading.Lock()
_jitted: dict[bool, dict[str, Any]] = {}  # interpret mode -> kernels (triton.jit decides the mode when it wraps)
_importable: Optional[bool] = None


# ------------------------------------------------------------------------------------------------ kernels
# Plain functions, wrapped by triton.jit on first use. Element (n, c, l) lies at (n * C + c) * L + l, or at
# (n * L + l) * C + c when NLC; n is int64 so that offsets past 2**31 values work. They call triton's builtins only,
# and sum with tl.reduce over triton's own sum combiner (what tl.sum compiles to): tl.sum and tl.zeros are jitted
# when triton is imported, so the interpreter cannot run them when TRITON_INTERPRET is set after that import.

def _moments_kernel(x_ptr, mean_ptr, m2_ptr, C, L, seg_rows, S, CB, NLC: tl.constexpr, ACC: tl.constexpr,
                    BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    pid = tl.program_id(0)
    s = pid % S
    n = (pid // S // CB).to(tl.int64)
    cs = (pid // S % CB) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < C
    l_begin = s * seg_rows
    l_end = tl.minimum(L, l_begin + seg_rows)
    mean = tl.full([BLOCK_C], 0.0, tl.float64)
    m2 = tl.full([BLOCK_C], 0.0, tl.float64)
    for l0 in range(l_begin, l_end, BLOCK_L):
        ls = l0 + tl.arange(0, BLOCK_L)
        mask = cmask[:, None] & (ls < l_end)[None, :]
        if NLC:
            offs = (n * L + ls[None, :]) * C + cs[:, None]
        else:
            offs = (n * C + cs[:, None]) * L + ls[None, :]
        v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        k = tl.minimum(l_end - l0, BLOCK_L)
        # the tile's mean m, then d = x - m: its sum corrects m and its squares carry no cancellation
        m = tl.reduce(v, 1, tl.standard._sum_combine) / k.to(ACC)
        d = tl.where(mask, v - m[:, None], 0.0)
        squares = tl.reduce(d * d, 1, tl.standard._sum_combine).to(tl.float64)
        residue = tl.reduce(d, 1, tl.standard._sum_combine).to(tl.float64)
        k64 = k.to(tl.float64)
        mean_b = m.to(tl.float64) + residue / k64
        m2_b = squares - residue * residue / k64
        # Chan: combine with the tiles before, all full, so their count is l0 - l_begin
        count = (l0 - l_begin).to(tl.float64)
        total = count + k64
        delta = mean_b - mean
        mean += delta * (k64 / total)
        m2 += m2_b + delta * delta * (count * k64 / total)
    out = (n * C + cs) * S + s
    tl.store(mean_ptr + out, mean, mask=cmask)
    tl.store(m2_ptr + out, m2, mask=cmask)


def _grad_sums_kernel(g_ptr, x_ptr, centre_ptr, sum_g_ptr, sum_gd_ptr, C, L, seg_rows, S, CB, NLC: tl.constexpr,
                      ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    pid = tl.program_id(0)
    s = pid % S
    n = (pid // S // CB).to(tl.int64)
    cs = (pid // S % CB) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < C
    m = tl.load(centre_ptr + n * C + cs, mask=cmask, other=0.0)
    l_begin = s * seg_rows
    l_end = tl.minimum(L, l_begin + seg_rows)
    total_g = tl.full([BLOCK_C], 0.0, tl.float64)
    total_gd = tl.full([BLOCK_C], 0.0, tl.float64)
    for l0 in range(l_begin, l_end, BLOCK_L):
        ls = l0 + tl.arange(0, BLOCK_L)
        mask = cmask[:, None] & (ls < l_end)[None, :]
        if NLC:
            offs = (n * L + ls[None, :]) * C + cs[:, None]
        else:
            offs = (n * C + cs[:, None]) * L + ls[None, :]
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC)
        v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        total_g += tl.reduce(g, 1, tl.standard._sum_combine).to(tl.float64)
        total_gd += tl.reduce(tl.where(mask, g * (v - m[:, None]), 0.0), 1, tl.standard._sum_combine).to(tl.float64)
    out = (n * C + cs) * S + s
    tl.store(sum_g_ptr + out, total_g, mask=cmask)
    tl.store(sum_gd_ptr + out, total_gd, mask=cmask)


def _affine_kernel(x_ptr, g_ptr, y_ptr, centre_ptr, a_ptr, b_ptr, c_ptr, C, L, LB, CB, NLC: tl.constexpr,
                   WITH_GRAD: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
                   BF16_BY_BITS: tl.constexpr):
    # y = (x - centre) * b + c, plus g * a when WITH_GRAD, per (n, c), in x's dtype and layout
    pid = tl.program_id(0)
    n = (pid // LB // CB).to(tl.int64)
    cs = (pid // LB % CB) * BLOCK_C + tl.arange(0, BLOCK_C)
    ls = (pid % LB) * BLOCK_L + tl.arange(0, BLOCK_L)
    cmask = cs < C
    mask = cmask[:, None] & (ls < L)[None, :]
    row = n * C + cs
    m = tl.load(centre_ptr + row, mask=cmask, other=0.0)
    b = tl.load(b_ptr + row, mask=cmask, other=0.0)
    c = tl.load(c_ptr + row, mask=cmask, other=0.0)
    if NLC:
        offs = (n * L + ls[None, :]) * C + cs[:, None]
    else:
        offs = (n * C + cs[:, None]) * L + ls[None, :]
    v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    value = (v - m[:, None]) * b[:, None] + c[:, None]
    if WITH_GRAD:
        a = tl.load(a_ptr + row, mask=cmask, other=0.0)
        value += tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC) * a[:, None]
    if BF16_BY_BITS:
        # triton's interpreter truncates float32 to bfloat16: round to nearest even (NaN kept), as the GPU's cvt.rn
        bits = value.to(tl.uint32, bitcast=True)
        bits = tl.where(value != value, 0x7FC0, (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16)
        tl.store(y_ptr + offs, bits.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(y_ptr + offs, value.to(y_ptr.dtype.element_ty), mask=mask)



def _kernels() -> dict[str, Any]:
    """The jitted kernels, wrapped on first use in the mode TRITON_INTERPRET sets then (triton.jit fixes the mode
    when it wraps a function, so each mode keeps its own wrappers)."""
    global tl
    import triton  # noqa: PLC0415 -- here, not at the top: importing snzoo never needs triton
    import triton.language as language  # noqa: PLC0415

    interpret = bool(triton.knobs.runtime.interpret)
    with _lock:
        if interpret not in _jitted:
            tl = language
            _jitted[interpret] = {
                "moments": triton.jit(_moments_kernel),
                "grad_sums": triton.jit(_grad_sums_kernel),
                "affine": triton.jit(_affine_kernel),
                torch.float32: language.float32,
                torch.float64: language.float64,
                "interpret": interpret,
            }
        return _jitted[interpret]


# ------------------------------------------------------------------------------------------------ host side
def enabled() -> bool:
    """True when SN layers may run these passes on CUDA tensors: SNZOO_TRITON=1 is set and triton imports."""
    global _importable
    if not env_flag("SNZOO_TRITON"):
        return False
    if _importable is None:
        try:
            import triton  # noqa: F401, PLC0415
        except ImportError:  # the CUDA wheels of torch bring triton; CPU-only installs lack it
            _importable = False
        else:
            _importable = True
    return _importable


def _device_fits(x: Tensor) -> bool:
    return x.device.type == "cuda" or (x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def fits(x: Tensor) -> bool:
    """True when these passes take x as it is: a CUDA tensor (or a CPU one under TRITON_INTERPRET=1), a floating
    dtype they read natively, dense as (N, C, L) or channels-innermost (N, L, C), at least 2 values per (sample,
    channel). The same conditions as `cpu_kernels.fits` on another device."""
    if not _device_fits(x) or x.dim() < 3 or x.dtype not in _DTYPES or x.numel() == 0:
        return False
    if x.numel() // (x.shape[0] * x.shape[1]) < 2:
        return False
    return x.is_contiguous() or x.movedim(1, -1).is_contiguous()


class _View(NamedTuple):
    n: int
    c: int
    l: int  # noqa: E741
    nlc: bool  # channels innermost
    acc: torch.dtype  # the compute dtype: float64 for float64, else float32


def _view(x: Tensor, op: str) -> _View:
    if not fits(x):
        raise KernelInputError(
            f"{op}: x (shape {tuple(x.shape)}, strides {x.stride()}, {x.dtype} on {x.device}) does not fit the "
            "Triton passes; they take a CUDA tensor (N, C, *) of float32, float64, bfloat16 or float16, contiguous "
            "or channels_last, with at least 2 values per (sample, channel): check fits(x) first"
        )
    n, c = x.shape[0], x.shape[1]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return _View(n, c, x.numel() // (n * c), not x.is_contiguous(), acc)


def _same_layout(t: Tensor, x: Tensor, op: str, what: str) -> None:
    if t.shape != x.shape or t.stride() != x.stride() or t.dtype != x.dtype or t.device != x.device:
        raise KernelInputError(f"{op}: {what} must have x's shape, strides, dtype and device (got shape "
                               f"{tuple(t.shape)}, strides {t.stride()}, {t.dtype} on {t.device}); copy it with "
                               "torch.empty_like(x).copy_(...)")


def _per_row(t: Tensor, v: _View, x: Tensor, op: str, what: str) -> Tensor:
    if t.numel() != v.n * v.c or not t.is_contiguous() or t.dtype != v.acc or t.device != x.device:
        raise KernelInputError(f"{op}: {what} must be a contiguous ({v.n}, {v.c}) {v.acc} tensor on {x.device} (got "
                               f"shape {tuple(t.shape)}, {t.dtype} on {t.device})")
    return t


def _on_device(x: Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it x's."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _next_pow2(k: int) -> int:
    return 1 << max(0, k - 1).bit_length()


def _blocks(v: _View) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_L): the memory-contiguous axis first, up to its cap, the other filling the tile."""
    if v.nlc:
        block_c = min(_next_pow2(v.c), _CHANNEL_BLOCK)
        return block_c, min(_next_pow2(v.l), _TILE // block_c)
    block_l = min(_next_pow2(v.l), _TILE)
    return min(_next_pow2(v.c), _TILE // block_l), block_l


class _Plan(NamedTuple):
    block_c: int
    block_l: int
    channel_blocks: int
    seg_rows: int  # positions per segment, whole tiles
    segments: int

    @property
    def programs(self) -> int:
        return self.channel_blocks * self.segments


def _reduction_plan(v: _View) -> _Plan:
    block_c, block_l = _blocks(v)
    tiles = max(1, min(-(-v.l // block_l), _SEGMENT // (block_c * block_l)))
    seg_rows = tiles * block_l
    return _Plan(block_c, block_l, -(-v.c // block_c), seg_rows, -(-v.l // seg_rows))


def _segment_counts(v: _View, plan: _Plan, device: torch.device) -> Tensor:
    starts = torch.arange(plan.segments, dtype=torch.float64, device=device) * plan.seg_rows
    return (v.l - starts).clamp(max=plan.seg_rows)


def moments(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-(n, c) IN mean and unbiased variance (float64, (N, C)) and the centre the other passes take values
    relative to (the mean rounded to the compute dtype, (N, C): float32 for half inputs, else x's dtype). x must
    `fits`."""
    v = _view(x, "moments")
    k, plan = _kernels(), _reduction_plan(v)
    f64 = dict(dtype=torch.float64, device=x.device)
    part_mean = torch.empty((v.n, v.c, plan.segments), **f64)
    part_m2 = torch.empty((v.n, v.c, plan.segments), **f64)
    with _on_device(x):
        k["moments"][(v.n * plan.programs,)](
            x, part_mean, part_m2, v.c, v.l, plan.seg_rows, plan.segments, plan.channel_blocks,
            NLC=v.nlc, ACC=k[v.acc], BLOCK_C=plan.block_c, BLOCK_L=plan.block_l,
        )
    if plan.segments == 1:
        mean, m2 = part_mean[..., 0], part_m2[..., 0]
    else:  # the segments' exact combination: m2 = sum m2_s + sum count_s * (mean_s - mean)^2
        counts = _segment_counts(v, plan, x.device)
        mean = (part_mean * counts).sum(-1) / v.l
        m2 = part_m2.sum(-1) + (counts * (part_mean - mean[..., None]).square()).sum(-1)
    return mean, m2 / (v.l - 1), mean.to(v.acc, copy=True)


def apply_affine(x: Tensor, centre: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """(x - centre) * scale + shift per (n, c) (all three contiguous (N, C) in the compute dtype), in x's dtype and
    layout."""
    v = _view(x, "apply_affine")
    centre, scale, shift = (_per_row(t, v, x, "apply_affine", what)
                            for t, what in ((centre, "centre"), (scale, "scale"), (shift, "shift")))
    return _affine(x, None, centre, None, scale, shift, v)


def grad_sums(g: Tensor, x: Tensor, centre: Tensor) -> tuple[Tensor, Tensor]:
    """Per-(n, c) sum of g and of g * (x - centre), float64 (N, C); g in x's layout and dtype."""
    v = _view(x, "grad_sums")
    _same_layout(g, x, "grad_sums", "g")
    centre = _per_row(centre, v, x, "grad_sums", "centre")
    k, plan = _kernels(), _reduction_plan(v)
    f64 = dict(dtype=torch.float64, device=x.device)
    part_g = torch.empty((v.n, v.c, plan.segments), **f64)
    part_gd = torch.empty((v.n, v.c, plan.segments), **f64)
    with _on_device(x):
        k["grad_sums"][(v.n * plan.programs,)](
            g, x, centre, part_g, part_gd, v.c, v.l, plan.seg_rows, plan.segments, plan.channel_blocks,
            NLC=v.nlc, ACC=k[v.acc], BLOCK_C=plan.block_c, BLOCK_L=plan.block_l,
        )
    if plan.segments == 1:
        return part_g[..., 0], part_gd[..., 0]
    return part_g.sum(-1), part_gd.sum(-1)


def grad_input(g: Tensor, x: Tensor, centre: Tensor, a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """g * a + (x - centre) * b + c per (n, c) (contiguous (N, C) in the compute dtype), in x's dtype and layout."""
    v = _view(x, "grad_input")
    _same_layout(g, x, "grad_input", "g")
    centre, a, b, c = (_per_row(t, v, x, "grad_input", what)
                       for t, what in ((centre, "centre"), (a, "a"), (b, "b"), (c, "c")))
    return _affine(x, g, centre, a, b, c, v)


def _affine(x: Tensor, g: Optional[Tensor], centre: Tensor, a: Optional[Tensor], b: Tensor, c: Tensor,
            v: _View) -> Tensor:
    y = torch.empty_like(x)  # preserve_format: x's dense layout, which the kernel writes in
    k = _kernels()
    block_c, block_l = _blocks(v)
    channel_blocks, length_blocks = -(-v.c // block_c), -(-v.l // block_l)
    with_grad = g is not None
    with _on_device(x):
        k["affine"][(v.n * channel_blocks * length_blocks,)](
            x, g if with_grad else x, y, centre, a if with_grad else b, b, c, v.c, v.l, length_blocks,
            channel_blocks, NLC=v.nlc, WITH_GRAD=with_grad, ACC=k[v.acc], BLOCK_C=block_c, BLOCK_L=block_l,
            BF16_BY_BITS=k["interpret"] and x.dtype == torch.bfloat16,
        )
    return y
