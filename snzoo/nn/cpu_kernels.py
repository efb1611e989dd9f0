"""snzoo's compiled CPU kernel for switchable normalisation (training and eval passes), built on first use.

`torch.utils.cpp_extension` compiles snzoo/nn/csrc/switch_norm_cpu.cpp once per machine (about 15 s, with the C++
compiler PyTorch uses; for the machine's own instruction set) into the cache folder, and later processes load the
built library. Without a compiler, or with SNZOO_CPU_KERNEL=0, SN layers run their PyTorch formulation: the same
results, slower (most in bfloat16 and channels_last). `use_kernel(False)` switches the kernel off inside a block; `build()` (the
command `snzoo build-kernel`) builds it ahead of time, e.g. in a container image.

Environment:
- SNZOO_CPU_KERNEL=0: never build or load the kernel.
- SNZOO_KERNEL_CACHE: where builds go (default: $XDG_CACHE_HOME/snzoo/kernels or ~/.cache/snzoo/kernels).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import shutil
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor

from snzoo.errors import KernelBuildError

SOURCE = Path(__file__).with_name("csrc") / "switch_norm_cpu.cpp"
# next to SOURCE; part of the build's name
HEADERS = ("sn_grad_passes.h", "sn_mixing.h", "sn_moments.h", "sn_passes.h", "sn_row_moments.h")
CFLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-fopenmp")
LDFLAGS = ("-fopenmp",)

_lock = threading.RLock()  # build() runs inside available()'s hold
_loaded: Optional[bool] = None  # None: not tried in this process
_enabled = True


def cache_dir() -> Path:
    """The folder that holds the kernel builds."""
    if os.environ.get("SNZOO_KERNEL_CACHE"):
        return Path(os.environ["SNZOO_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "snzoo" / "kernels"


def _cpu_signature() -> str:
    """The instruction-set flags of this CPU: a build for -march=native must not run on another kind of CPU that
    shares the cache folder (a home directory on a cluster)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def build_name() -> str:
    """The extension's name: changes with the source, the flags, torch, Python and the CPU."""
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), *(SOURCE.with_name(h).read_bytes() for h in HEADERS), " ".join(CFLAGS + LDFLAGS).encode(), torch.__version__.encode(),
                 sys.version.encode(), platform.machine().encode(), _cpu_signature().encode()):
        digest.update(part)
    return f"snzoo_cpu_{digest.hexdigest()[:16]}"


def library_path() -> Path:
    """Where this machine's build of the kernel lives (it may not be built yet)."""
    name = build_name()
    return cache_dir() / name / f"{name}.so"


def build() -> Path:
    """Build the kernel now, or load it if it is built, and return its library's path (else it is built on the first
    SN forward on the CPU). Raises KernelBuildError, with the reason, when that is not possible."""
    global _loaded
    if _switched_off():
        raise KernelBuildError("the SN CPU kernel is switched off by SNZOO_CPU_KERNEL=0; unset it to build the kernel")
    if not SOURCE.is_file() or not all(SOURCE.with_name(h).is_file() for h in HEADERS):
        raise KernelBuildError(f"the SN CPU kernel's source {SOURCE} is missing; reinstall snzoo (pip install "
                               "--force-reinstall snzoo)")
    library = library_path()
    with _lock:
        if not hasattr(torch.ops.snzoo, "switch_norm"):  # else loaded already, by this or another copy of us
            try:
                _build_and_load(library)
            except Exception as exc:
                raise KernelBuildError(
                    f"could not build the SN CPU kernel ({_reason(exc)}); "
                    "install a C++ compiler (Debian: apt-get install g++) and ninja (pip install ninja)"
                ) from exc
            _register_fakes()
        _loaded = True
    return library


def _register_fakes() -> None:
    """Shapes, dtypes and layouts of the operators' results without running them: what torch.compile and
    torch.export trace with (FakeTensor), so that they see one operator per layer and direction."""

    def stats(x):
        n, c = x.shape[0], x.shape[1]
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        f64 = x.new_empty((n, c), dtype=torch.float64)
        return f64, torch.empty_like(f64), x.new_empty((n, c), dtype=compute)

    @torch.library.register_fake("snzoo::switch_norm")
    def _(x, *_args):
        return torch.empty_like(x)

    @torch.library.register_fake("snzoo::switch_norm_forward")
    def _(x, *_args):
        return (torch.empty_like(x), *stats(x))

    @torch.library.register_fake("snzoo::switch_norm_backward")
    def _(grad_y, x, weight, bias, mean_probs, var_probs, *_args):
        return tuple(torch.empty_like(t) for t in (x, weight, bias, mean_probs, var_probs))

    @torch.library.register_fake("snzoo::sn_moments")
    def _(x):
        return stats(x)

    @torch.library.register_fake("snzoo::sn_apply")
    def _(x, *_args):
        return torch.empty_like(x)

    @torch.library.register_fake("snzoo::sn_grad_sums")
    def _(g, x, centre):
        mean, var, _ = stats(x)
        return mean, var

    @torch.library.register_fake("snzoo::sn_grad_input")
    def _(g, x, *_args):
        return torch.empty_like(x)


def _switched_off() -> bool:
    return os.environ.get("SNZOO_CPU_KERNEL", "1") == "0"


def _reason(exc: Exception) -> str:
    """A build error on one line: its end, where the build tool puts the compiler's complaint (the start is the
    command line, and compiler output can run to pages)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {'...' + text[-240:] if len(text) > 240 else text}"


def _build_and_load(library: Path) -> None:
    folder, name = library.parent, library.parent.name
    if library.exists():
        # built before: load it without asking the build system, unless it changed since (a damaged library can
        # crash the process that maps it, so its checksum is checked first)
        checksum = _checksum_file(library)
        if checksum.is_file() and checksum.read_text().strip() == _sha256(library):
            torch.ops.load_library(str(library))
            return
        shutil.rmtree(folder, ignore_errors=True)
    with _quiet_build_logger():
        from torch.utils import cpp_extension
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Built in a staging folder that takes the final name only once the library has loaded: an interrupted or
    # failed build never leaves a library in the cache.
    staging = Path(tempfile.mkdtemp(prefix=f"{name}.building-", dir=folder.parent))
    print(f"snzoo: building the SN CPU kernel once into {folder} (about 15 s)", file=sys.stderr)
    try:
        with _ninja_on_path(), _quiet_build_logger():
            cpp_extension.load(
                name=name, sources=[str(SOURCE)], extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS),
                build_directory=str(staging), is_python_module=False, verbose=False,
            )
        built = staging / library.name
        _checksum_file(built).write_text(_sha256(built) + "\n")
        try:
            staging.rename(folder)
        except OSError:  # another process finished the same build first; its library is as good
            pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _checksum_file(library: Path) -> Path:
    return library.with_name(library.name + ".sha256")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@contextlib.contextmanager
def _quiet_build_logger() -> Iterator[None]:
    """cpp_extension logs warnings about CUDA on CPU-only machines and about compilers other than PyTorch's, which
    say nothing about whether this build works (its own errors still raise)."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _ninja_on_path() -> Iterator[None]:
    """The build system looks for `ninja` on PATH; the PyPI package's binary sits in the environment's bin folder,
    which is not on PATH when Python runs from a virtual environment that is not activated."""
    try:
        import ninja  # noqa: PLC0415
    except ImportError:
        yield
        return
    path = os.environ.get("PATH", "")
    if ninja.BIN_DIR in path.split(os.pathsep):
        yield
        return
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + path
    try:
        yield
    finally:
        os.environ["PATH"] = path


def available() -> bool:
    """True when the kernel is loaded in this process; the first call builds or loads it (never raises: a failed
    build leaves one warning and the PyTorch formulation)."""
    global _loaded
    if _loaded is not None:
        return _loaded
    with _lock:
        if _loaded is None and _switched_off():
            _loaded = False
        elif _loaded is None:
            try:
                build()
            except KernelBuildError as exc:  # no compiler, no ninja, a failed build: fall back, say so once
                warnings.warn(
                    f"snzoo: {exc}, or set SNZOO_CPU_KERNEL=0 to skip the build; SN layers use their PyTorch "
                    "formulation (same results, slower eval)",
                    RuntimeWarning, stacklevel=2,
                )
                _loaded = False
    return _loaded


def active() -> bool:
    """True when SN layers on the CPU run the kernel now: it is loaded and not switched off by `use_kernel`."""
    return _enabled and available()


@contextlib.contextmanager
def use_kernel(enabled: bool) -> Iterator[None]:
    """Inside the block, SN layers on the CPU run the kernel (True, where it builds) or PyTorch ops
    (False); the previous choice comes back after it."""
    global _enabled
    previous, _enabled = _enabled, bool(enabled)
    try:
        yield
    finally:
        _enabled = previous


_SLOTS = {"in": 0, "ln": 1, "bn": 2}


def term_slots(terms: Sequence[str]) -> list[int]:
    """The kernel's code of each term (0 IN, 1 LN, 2 BN), in the order of the probabilities."""
    return [_SLOTS[t] for t in terms]


def switch_norm(x: Tensor, weight: Tensor, bias: Tensor, mean_probs: Tensor, var_probs: Tensor,
                slots: Sequence[int], group: int, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                training: bool, momentum: float, using_moving_average: bool, eps: float,
                logits: bool = False, relu: bool = False, residual: Optional[Tensor] = None) -> Tensor:
    """A whole SN layer on CPU x (N, C, *) that `fits`, in one operator call per direction (autograd included):
    the statistics, the mixing, the output and, in training with a BN term, the running buffers' update (in place).
    slots: `term_slots(terms)`; group: the samples of one BN statistics group (a ghost batch, else N). In eval a BN
    term takes the running buffers. logits: mean_probs and var_probs are the raw importance weights, whose softmax
    the operator takes (torch's, the same values as the layer's `importance_weights()`) and whose gradients its
    backward returns: two softmax calls and their backward nodes fewer per layer and step. residual (x's shape,
    strides and dtype) and relu: the output is relu(layer(x) + residual), added and clamped in the output pass (the
    values of the separate operations, each a pass over memory fewer). Call `available()` first."""
    return torch.ops.snzoo.switch_norm.default(x, weight, bias, mean_probs, var_probs, slots, group, running_mean,
                                               running_var, training, momentum, using_moving_average, eps, logits,
                                               relu, residual)


def fits(x: Tensor) -> bool:
    """True when the kernel's full-size passes take x as it is: CPU, a floating dtype it reads natively, dense as
    (N, C, L) or channels-innermost (N, L, C), at least 2 values per (sample, channel)."""
    # Runs once per SN layer call: the cheapest tests first, and no movedim view for the usual layouts.
    if x.device.type != "cpu" or x.dtype not in DTYPES:
        return False
    dims = x.dim()
    if dims < 3:
        return False
    rows = x.shape[0] * x.shape[1]
    if rows == 0 or x.numel() < 2 * rows:
        return False
    if x.is_contiguous():
        return True
    if dims in _CHANNELS_LAST:
        return x.is_contiguous(memory_format=_CHANNELS_LAST[dims])
    return x.movedim(1, -1).is_contiguous()


DTYPES = frozenset((torch.float32, torch.float64, torch.bfloat16, torch.float16))
_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def moments(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-(n, c) IN mean and unbiased variance (float64, (N, C)) and the centre the kernel's other passes take
    values relative to (the rounded mean, (N, C), float32 for half inputs, else x's dtype). x must `fits`."""
    return torch.ops.snzoo.sn_moments(x)


def apply_affine(x: Tensor, centre: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """(x - centre) * scale + shift per (n, c) (all three (N, C) in centre's dtype), in x's dtype and layout."""
    return torch.ops.snzoo.sn_apply(x, centre, scale, shift)


def grad_sums(g: Tensor, x: Tensor, centre: Tensor) -> tuple[Tensor, Tensor]:
    """Per-(n, c) sum of g and of g * (x - centre), float64 (N, C); g in x's layout and dtype."""
    return torch.ops.snzoo.sn_grad_sums(g, x, centre)


def grad_input(g: Tensor, x: Tensor, centre: Tensor, a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """g * a + (x - centre) * b + c per (n, c) ((N, C) in centre's dtype), in x's dtype and layout."""
    return torch.ops.snzoo.sn_grad_input(g, x, centre, a, b, c)
