"""Torch helpers shared by evaluation, benchmarks and export: mixed precision and a model's input channels."""

from __future__ import annotations

import contextlib
from typing import Optional, Union

import torch
from torch import nn

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
