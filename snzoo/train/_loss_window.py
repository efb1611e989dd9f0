"""The losses of a run's latest steps, held on the device until the host needs them.

Reading a loss on the host (`.item()`, a finiteness test) waits for the device to finish the step, so a loop
that reads every step never lets a GPU run ahead of Python. The loop hands each step's loss to a LossWindow and
reads them all in one transfer where it logs, checkpoints or stops; the read also finds the first step whose
loss was non-finite on any rank, so a diverged run is still reported at the step where it diverged, and no
checkpoint is written after it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from snzoo.train.distributed import DistInfo, finite_on_every_rank


@dataclass(frozen=True)
class HeldStep:
    """Where a held loss comes from."""

    epoch: int
    step_in_epoch: int
    lr: float


@dataclass(frozen=True)
class ReadLosses:
    """What one read found: the losses in step order and, when any was non-finite, the first such step."""

    values: list[float]
    steps: list[HeldStep]
    first_non_finite: Optional[int] = None  # an index into values / steps


class LossWindow:
    """Step losses kept as device tensors; `read` brings them to the host and empties the window.

    The tensors are the ones the step computed (no copy), so the values read are bit for bit what a read at each
    step would have given. Under torch.distributed every rank must read at the same steps (read holds one
    all-reduce).
    """

    def __init__(self, info: DistInfo) -> None:
        self.info = info
        self._losses: list[torch.Tensor] = []
        self._steps: list[HeldStep] = []

    def __len__(self) -> int:
        return len(self._losses)

    def add(self, loss: torch.Tensor, epoch: int, step_in_epoch: int, lr: float) -> None:
        """Hold a step's (detached, scalar) loss."""
        self._losses.append(loss)
        self._steps.append(HeldStep(epoch, step_in_epoch, lr))

    def read(self) -> ReadLosses:
        """The held losses as Python floats, in step order; finite or not on every rank (one transfer)."""
        losses, steps = self._losses, self._steps
        self._losses, self._steps = [], []
        if not losses:
            return ReadLosses([], [])
        stacked = torch.stack(losses)
        # Every rank stops at the first step that was non-finite anywhere, as a per-step check would.
        flags = finite_on_every_rank(torch.isfinite(stacked), self.info)
        values = stacked.tolist()
        first = next((i for i, ok in enumerate(flags) if not ok), None)
        return ReadLosses(values, steps, first)
