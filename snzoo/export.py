"""Export of SN models to ONNX and TorchScript for inference.

    import snzoo.export
    snzoo.export.export_onnx("resnet50v1_sn", "resnet50v1_sn.onnx")

An exported model is the eval-mode model as a fixed function of its input. In a copy of the model every SN
layer is replaced by a `FrozenSwitchNorm`: its importance weights (softmax, or sparsestmax for SSN) are computed
once, the BN term's running statistics are folded with them into per-channel constants, and the output is one
multiply-add with a per-(sample, channel) scale and shift:

    mean  = p_in * mean_in + p_ln * mean_ln + p_bn * running_mean    (var alike, with the variance weights)
    scale = weight * rsqrt(var + eps),   shift = bias - mean * scale,   y = x * scale + shift

So the graph holds no softmax, no sparsestmax and none of SSN's control flow on tensor values, and no
statistics over the batch: the batch size of an exported model is free. The model passed in is not changed.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import os
import sys
import warnings
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import torch
from torch import Tensor, nn

from snzoo.errors import OutputError, SnzooError
from snzoo.nn import functional as F_sn
from snzoo.nn.switchnorm import _SwitchNorm

MIN_OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
TORCHSCRIPT_METHODS = ("trace", "script")

ModelOrName = Union[nn.Module, str]


class ExportError(SnzooError, RuntimeError):
    """An export that cannot be made: bad settings, a missing package, or a failure of the exporter."""


def _expand_channels(t: Tensor, dim: int) -> Tensor:
    """(N or 1, C) -> broadcastable against an input of `dim` dimensions (N, C, *spatial)."""
    for _ in range(dim - 2):
        t = t.unsqueeze(-1)
    return t


class FrozenSwitchNorm(nn.Module):
    """An eval-mode SN layer with constant importance weights, computed in the fused formulation.

    Built from any SN layer (SwitchNorm1d/2d/3d, SyncSwitchNorm2d, SparseSwitchNorm2d); equal to that layer in
    eval mode. The statistics are the ones of `snzoo.nn.functional` (unbiased IN variance, LN built from the IN
    moments). IN and LN terms whose mean and variance weights are both zero (common with SSN) are left out of
    the graph; a layer with only the BN term is a per-channel affine map with constant scale and shift. The
    forward is scriptable, so `torch.jit.script` keeps its handling of any spatial size.
    """

    def __init__(self, layer: _SwitchNorm) -> None:
        super().__init__()
        c = layer.num_features
        with torch.no_grad():  # no gradient, so an SSN layer in training mode does not fix its weights here
            mean_probs, var_probs = layer.importance_weights()
        p = {t: float(w) for t, w in zip(layer.terms, mean_probs.detach().cpu().tolist())}
        q = {t: float(w) for t, w in zip(layer.terms, var_probs.detach().cpu().tolist())}
        self.num_features = c
        self.eps = float(layer.eps)
        self.mean_in, self.var_in = p.get("in", 0.0), q.get("in", 0.0)
        self.mean_ln, self.var_ln = p.get("ln", 0.0), q.get("ln", 0.0)
        self.use_in = self.mean_in != 0.0 or self.var_in != 0.0
        self.use_ln = self.mean_ln != 0.0 or self.var_ln != 0.0
        self.per_sample = self.use_in or self.use_ln
        # SwitchNorm1d on (N, C) takes the LN variance over C unbiased, as the layer does (biased for C == 1).
        self.flat_correction = 1 if c > 1 else 0

        dtype = layer.weight.dtype
        # The constants are folded in float64 and rounded once, so they are as exact as the eager layer's.
        weight = layer.weight.detach().reshape(1, c).double()
        bias = layer.bias.detach().reshape(1, c).double()
        if layer.using_bn and "bn" in p:
            bn_mean = p["bn"] * layer.running_mean.detach().reshape(1, c).double()
            bn_var = q["bn"] * layer.running_var.detach().reshape(1, c).double()
        else:
            bn_mean = torch.zeros(1, c, dtype=torch.float64, device=weight.device)
            bn_var = torch.zeros(1, c, dtype=torch.float64, device=weight.device)
        scale = weight * torch.rsqrt(bn_var + self.eps)
        for name, value in (
            ("weight", weight),
            ("bias", bias),
            ("bn_mean", bn_mean),
            ("bn_var_eps", bn_var + self.eps),  # the BN variance term with eps added once
            ("scale", scale),  # used only without per-sample terms
            ("shift", bias - bn_mean * scale),
        ):
            self.register_buffer(name, value.to(dtype))

    def forward(self, x: Tensor) -> Tensor:
        if self.per_sample:
            scale, shift = self._per_sample_scale_shift(x)
        else:
            scale, shift = self.scale, self.shift
        return x * _expand_channels(scale, x.dim()) + _expand_channels(shift, x.dim())

    def _per_sample_scale_shift(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mean = self.bn_mean
        var = self.bn_var_eps
        if x.dim() == 2:
            var_ln, mean_ln = torch.var_mean(x, dim=1, keepdim=True, correction=self.flat_correction)
        else:
            mean_in, var_in = F_sn.instance_stats(x.flatten(2))
            mean_in, var_in = mean_in.squeeze(2), var_in.squeeze(2)
            if self.use_in:
                mean = mean + self.mean_in * mean_in
                var = var + self.var_in * var_in
            mean_ln, var_ln = F_sn.layer_stats(mean_in, var_in + mean_in * mean_in)
        if self.use_ln:
            mean = mean + self.mean_ln * mean_ln
            var = var + self.var_ln * var_ln
        scale = self.weight * torch.rsqrt(var)
        return scale, self.bias - mean * scale

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, mean weights (in, ln)=({self.mean_in:.4g}, {self.mean_ln:.4g}), "
            f"var weights (in, ln)=({self.var_in:.4g}, {self.var_ln:.4g}), per_sample={self.per_sample}"
        )


def frozen_copy(model: nn.Module) -> nn.Module:
    """An eval-mode float32 CPU copy of `model` whose SN layers are `FrozenSwitchNorm`s, without gradients.

    The model itself is not changed: its SN layers are not copied at all, and the rest is deep-copied.
    """
    layers = [m for m in model.modules() if isinstance(m, _SwitchNorm)]
    # deepcopy takes what the memo holds for an object, so the copy gets the frozen layers in their places.
    memo = {id(layer): FrozenSwitchNorm(layer) for layer in layers}
    frozen = copy.deepcopy(model, memo) if not isinstance(model, _SwitchNorm) else memo[id(model)]
    return frozen.float().cpu().eval().requires_grad_(False)


def _build(model_or_name: ModelOrName) -> tuple[nn.Module, str]:
    if isinstance(model_or_name, nn.Module):
        return model_or_name, getattr(model_or_name, "architecture", type(model_or_name).__name__)
    if not isinstance(model_or_name, str):
        raise ExportError(f"expected a model or a model name, got {type(model_or_name).__name__}")
    from snzoo.factory import create_model

    return create_model(model_or_name, pretrained=True), model_or_name


def _input_channels(model: nn.Module, in_chans: Optional[int]) -> int:
    first_conv = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    if in_chans is None:
        if first_conv is None:
            raise ExportError("cannot tell the model's input channels (it has no convolution); pass in_chans")
        return first_conv.in_channels
    if first_conv is not None and first_conv.in_channels != in_chans:
        raise ExportError(
            f"in_chans={in_chans} does not match the model, whose first convolution takes {first_conv.in_channels} channels"
        )
    return in_chans


def example_input(model: nn.Module, batch: int = 1, size: int = 224, in_chans: Optional[int] = None) -> Tensor:
    """A random float32 (batch, C, size, size) input for `model`, C being its input channels by default.

    Drawn from a fixed seed with its own generator, so the caller's global RNG is left as it was.
    """
    if batch < 1 or size < 1:
        raise ExportError(f"batch and size must be positive, got batch={batch}, size={size}")
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, _input_channels(model, in_chans), size, size, generator=generator)


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    # The traced graph has no control flow on tensor values once the SN layers are frozen; the only Python
    # branches left depend on the spatial size, which an export fixes. The tracer's warnings about them, and
    # the deprecation notices of the TorchScript tracer and exporter (chosen deliberately, see export_onnx),
    # would only confuse the user of the exported file.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings(
            "ignore", message=r".*(legacy TorchScript-based ONNX export|torch\.jit\.\w+` is deprecated|The feature will be removed)"
        )
        yield


@contextlib.contextmanager
def _exporter_stdout_discarded() -> Iterator[None]:
    # When an export fails, the TorchScript-based exporter logs the whole Torch IR graph (hundreds of lines) from
    # C++ to the process's standard output: torch.onnx leaves its log switched on whatever `verbose` says. That
    # would bury the one-line error, and only redirecting file descriptor 1 reaches C++ output.
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def check_opset(opset: int) -> None:
    """Raise ExportError for an opset the exporter cannot write; callers check it before loading weights."""
    if opset < MIN_OPSET:
        raise ExportError(f"ONNX export needs opset {MIN_OPSET} or later, got {opset}")


def check_output(out_path: Union[str, os.PathLike]) -> Path:
    """The export's file as a Path, or an error when it cannot be written: a folder, or under a file. Callers
    check it before loading weights, so a typo does not cost a download."""
    out = Path(out_path)
    if out.is_dir():
        raise ExportError(f"{out} is a directory; give the path of the file to write")
    ancestor = out.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"cannot write {out}: {ancestor} is a file, not a folder; choose another output path")
    return out


def _write_atomically(out_path: Union[str, os.PathLike], write: Callable[[Path], None]) -> Path:
    """Run write(tmp) on a temporary file beside out_path and rename it into place when complete."""
    out = check_output(out_path)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, out)
    except SnzooError:
        tmp.unlink(missing_ok=True)
        raise
    except OSError as exc:
        with contextlib.suppress(OSError):  # not there when the folder itself could not be made
            tmp.unlink(missing_ok=True)
        raise OutputError.cannot_write(out, exc) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def export_onnx(
    model_or_name: ModelOrName,
    out_path: Union[str, os.PathLike],
    *,
    size: int = 224,
    batch: int = 1,
    dynamic_batch: bool = True,
    opset: int = MIN_OPSET,
    in_chans: Optional[int] = None,
) -> Path:
    """Write the eval-mode model as an ONNX file (input "input" (N, C, size, size), output "logits").

    model_or_name: a model, or an architecture / zoo entry name built with its pretrained weights.
    batch: the batch size of the example input; with dynamic_batch (default) the batch axis is free.
    in_chans: input channels (default: those of the model's first convolution).
    Uses the TorchScript-based exporter of torch.onnx, which writes the requested opset (>= 17) as it is.
    """
    check_opset(opset)
    if importlib.util.find_spec("onnx") is None:
        raise ExportError("ONNX export needs the onnx package: pip install onnx")
    model, label = _build(model_or_name)
    frozen = frozen_copy(model)
    example = example_input(frozen, batch, size, in_chans)
    dynamic_axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None

    def write(tmp: Path) -> None:
        # The torch.export-based exporter also works here, but takes ~10x longer, writes opset 18 at the least
        # and loses the module scopes in node names; the TorchScript-based one suffices for these graphs.
        try:
            with _quiet_export(), _exporter_stdout_discarded():
                torch.onnx.export(
                    frozen, (example,), str(tmp), dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME], dynamic_axes=dynamic_axes, do_constant_folding=True,
                )
            _read_shared_initializers_directly(tmp)
        except SnzooError:
            raise
        except Exception as exc:
            raise ExportError(f"ONNX export of {label} failed: {_first_line(exc)}") from exc

    return _write_atomically(out_path, write)


def _read_shared_initializers_directly(path: Path) -> None:
    """Rewrite an ONNX file so that nodes read shared initializers directly, not through Identity nodes.

    The exporter stores equal-valued parameters and buffers once and names the copies with Identity nodes (a
    freshly initialised model has many: every weight of ones). With graph optimisations on, onnxruntime 1.32
    refuses such files ("... is not a graph input, initializer, or output of a previous node").
    """
    import onnx

    proto = onnx.load(str(path))
    graph = proto.graph
    initializers = {t.name for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    source: dict[str, str] = {}
    kept = []
    for node in graph.node:
        origin = source.get(node.input[0], node.input[0]) if node.input else ""
        if node.op_type == "Identity" and origin in initializers and node.output[0] not in outputs:
            source[node.output[0]] = origin
        else:
            kept.append(node)
    if not source:
        return
    for node in kept:
        node.input[:] = [source.get(name, name) for name in node.input]
    del graph.node[:]
    graph.node.extend(kept)
    onnx.save(proto, str(path))


def _script_layers(model: nn.Module) -> nn.Module:
    for name, module in list(model.named_modules()):
        if name and isinstance(module, FrozenSwitchNorm):
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, torch.jit.script(module))
    return model


def export_torchscript(
    model_or_name: ModelOrName,
    out_path: Union[str, os.PathLike],
    *,
    size: int = 224,
    method: str = "trace",
) -> Path:
    """Write the eval-mode model as a TorchScript file (load with torch.jit.load), traced at size x size.

    method "trace": the whole model is traced. "script": the SN layers are compiled with torch.jit.script and
    the rest traced, so the statistics stay right for any input size (e.g. when a map shrinks to 1x1). The
    ResNets' own Python code is not scriptable as a whole, and has no control flow that tracing would lose.
    """
    if method not in TORCHSCRIPT_METHODS:
        raise ExportError(f"method must be one of {', '.join(TORCHSCRIPT_METHODS)}, got {method!r}")
    model, label = _build(model_or_name)
    frozen = frozen_copy(model)
    example = example_input(frozen, 1, size)

    def write(tmp: Path) -> None:
        try:
            with _quiet_export():
                if method == "script" and isinstance(frozen, FrozenSwitchNorm):
                    compiled = torch.jit.script(frozen)
                else:
                    module = _script_layers(frozen) if method == "script" else frozen
                    # No re-run to compare traces: the frozen graph has no data-dependent paths to diverge, and
                    # check_export compares the saved file with the model itself.
                    compiled = torch.jit.trace(module, (example,), check_trace=False)
                torch.jit.save(compiled, str(tmp))
        except SnzooError:
            raise
        except Exception as exc:
            raise ExportError(f"TorchScript export ({method}) of {label} failed: {_first_line(exc)}") from exc

    return _write_atomically(out_path, write)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def check_export(model: nn.Module, path: Union[str, os.PathLike], inputs: Tensor) -> float:
    """Max abs difference between the eval-mode model and an exported file on `inputs`.

    A .onnx file runs in onnxruntime (CPU); anything else is loaded with torch.jit.load. The model's training
    flags are restored afterwards.
    """
    path = Path(path)
    device = next(model.parameters(), torch.empty(0)).device
    with torch.no_grad(), _eval_mode(model):
        expected = model(inputs.to(device)).float().cpu()
    cpu_inputs = inputs.detach().float().cpu()
    if path.suffix == ".onnx":
        try:
            import onnxruntime
        except ImportError:
            raise ExportError("checking an ONNX file needs onnxruntime: pip install onnxruntime") from None
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: cpu_inputs.numpy()}
        got = torch.from_numpy(session.run(None, feed)[0])
    else:
        with _quiet_export():
            loaded = torch.jit.load(str(path), map_location="cpu")
        with torch.no_grad():
            got = loaded(cpu_inputs)
    if got.shape != expected.shape:
        raise ExportError(f"{path} returns shape {tuple(got.shape)}, the model {tuple(expected.shape)}")
    return float((got - expected).abs().max())
