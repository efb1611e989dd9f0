"""Replacing modules of a model tree in place (the conversion and freezing helpers share it)."""

from __future__ import annotations

from typing import Callable, Optional

from torch import nn


def replace_modules(module: nn.Module, replacement: Callable[[nn.Module], Optional[nn.Module]]) -> nn.Module:
    """Replace, depth first, every submodule for which `replacement` returns a module; returns `module`, or its
    replacement when `module` itself is replaced (a bare layer passed directly)."""
    new = replacement(module)
    if new is not None:
        return new
    for name, child in list(module.named_children()):
        converted = replace_modules(child, replacement)
        if converted is not child:
            setattr(module, name, converted)
    return module
