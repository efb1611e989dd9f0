"""Torch helpers shared by evaluation, benchmarks and export: mixed precision and a model's input channels."""

from __future__ import annotations

import contextlib
from typing import Optional, Union

import torch
from torch import nn

from snzoo.errors import DeviceError

AMP_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def autocast(device: torch.device, amp: Union[None, bool, str]):
    """torch.autocast for an amp setting (a dtype name of AMP_DTYPES, True for bfloat16), or a no-op for none."""
    if not amp:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp is True else AMP_DTYPES[amp]
    return torch.autocast(device_type=device.type, dtype=dtype)


def input_channels(model: nn.Module) -> Optional[int]:
    """The input channels of a model's first convolution, or None when it has none."""
    first_conv = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    return None if first_conv is None else first_conv.in_channels


def check_device(device: Union[str, torch.device]) -> torch.device:
    """The torch.device for `device`, or DeviceError when it is no device type or a GPU that is not here."""
    try:
        torch_device = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if torch_device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {str(device)!r} asked for, but torch sees no CUDA GPU here; use --device cpu")
        if torch_device.index is not None and torch_device.index >= torch.cuda.device_count():
            raise DeviceError(f"device {str(device)!r} asked for, but this machine has {torch.cuda.device_count()} "
                              "CUDA GPU(s); use cuda:0 or a lower index")
    return torch_device
