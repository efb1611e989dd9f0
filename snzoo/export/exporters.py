"""Export of SN models to ONNX and TorchScript for inference.

    from snzoo.export import export_onnx
    export_onnx("resnet50v1_sn", "resnet50v1_sn.onnx")

An exported model is the eval-mode model as a fixed function of its input: every SN layer of a copy is a
`snzoo.nn.FrozenSwitchNorm` (importance weights and the BN term's running statistics folded into per-channel
constants, one multiply-add per value), so the graph holds no softmax, no sparsestmax, none of SSN's control
flow and no statistics over the batch: the batch size of an exported model is free. The model passed in is
not changed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import warnings
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import torch
from torch import Tensor, nn

from snzoo.errors import ExportError, SnzooError
from snzoo._factory import create_model
from snzoo._io import atomic_path, check_output_path, first_line
from snzoo._torch_utils import input_channels
from snzoo.nn.frozen import FrozenSwitchNorm, frozen_copy

MIN_OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
TORCHSCRIPT_METHODS = ("trace", "script")

ModelOrName = Union[nn.Module, str]


def _build(model_or_name: ModelOrName) -> tuple[nn.Module, str]:
    if isinstance(model_or_name, nn.Module):
        return model_or_name, getattr(model_or_name, "architecture", type(model_or_name).__name__)
    if not isinstance(model_or_name, str):
        raise ExportError(f"expected a model or a model name, got {type(model_or_name).__name__}")
    return create_model(model_or_name, pretrained=True), model_or_name


def _input_channels(model: nn.Module, in_chans: Optional[int]) -> int:
    model_channels = input_channels(model)
    if in_chans is None:
        if model_channels is None:
            raise ExportError("cannot tell the model's input channels (it has no convolution); pass in_chans")
        return model_channels
    if model_channels is not None and model_channels != in_chans:
        raise ExportError(
            f"in_chans={in_chans} does not match the model, whose first convolution takes {model_channels} channels"
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
    return check_output_path(out)


def _write_atomically(out_path: Union[str, os.PathLike], write: Callable[[Path], None]) -> Path:
    """Run write(tmp) on a temporary file beside out_path and rename it into place when complete."""
    out = check_output(out_path)
    with atomic_path(out) as tmp:
        write(tmp)
    return out


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
            raise ExportError(f"ONNX export of {label} failed: {first_line(exc, with_type=True)}") from exc

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
            raise ExportError(f"TorchScript export ({method}) of {label} failed: {first_line(exc, with_type=True)}") from exc

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
