"""Export of SN models to ONNX and TorchScript for inference, with a check against the eager model."""

from snzoo.export.exporters import (
    INPUT_NAME,
    MIN_OPSET,
    OUTPUT_NAME,
    TORCHSCRIPT_METHODS,
    check_export,
    check_opset,
    check_output,
    example_input,
    export_onnx,
    export_torchscript,
)
from snzoo.errors import ExportError
from snzoo.nn.frozen import FrozenSwitchNorm, frozen_copy

__all__ = [
    "INPUT_NAME", "MIN_OPSET", "OUTPUT_NAME", "TORCHSCRIPT_METHODS", "ExportError", "FrozenSwitchNorm",
    "check_export", "check_opset", "check_output", "example_input", "export_onnx", "export_torchscript", "frozen_copy",
]
