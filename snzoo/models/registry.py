"""Architecture names and the builders behind them."""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass
from typing import Callable

from torch import nn

from snzoo.errors import UnknownModelError

NORMS = ("sn", "ssn", "bn", "gn")


@dataclass(frozen=True)
class ArchitectureSpec:
    """What an architecture name stands for: a ResNet of a depth, a version and a norm."""

    name: str
    depth: int
    version: int
    norm: str
    builder: Callable[..., nn.Module]

    def build(self, **kwargs) -> nn.Module:
        """Build the architecture; kwargs go to the ResNet constructor (num_classes, norm arguments...)."""
        return self.builder(depth=self.depth, norm=self.norm, **kwargs)


ARCHITECTURES: dict[str, ArchitectureSpec] = {}


def register_architecture(name: str, depth: int, version: int, norm: str, builder: Callable[..., nn.Module]) -> None:
    """Add an architecture name to the registry."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    ARCHITECTURES[name] = ArchitectureSpec(name, depth, version, norm, builder)


def list_architectures(pattern: str = "*") -> list[str]:
    """Architecture names matching an fnmatch pattern (any case), sorted."""
    pattern = pattern.lower()
    return sorted(n for n in ARCHITECTURES if fnmatch.fnmatchcase(n, pattern))


def get_architecture(name: str) -> ArchitectureSpec:
    """The spec of an architecture name, or an error suggesting the closest known names."""
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise UnknownModelError(unknown_name_message("architecture", name, ARCHITECTURES)) from None


def unknown_name_message(what: str, name: str, known) -> str:
    """One line naming an unknown name and the closest known ones."""
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else "; `snzoo list` shows the known names"
    return f"unknown {what} {name!r}{hint}"
