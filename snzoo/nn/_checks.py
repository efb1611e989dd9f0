"""The rules every SN and ghost-BN code path shares: how a batch splits into ghost batches, that synchronised
statistics and ghost batches exclude each other, and which torch.distributed group `process_group=True` means."""

from __future__ import annotations

from typing import Optional

import torch.distributed as dist


def ghost_group_size(n: int, ghost_batch_size: Optional[int]) -> int:
    """The samples of one BN statistics group in a batch of n: the ghost batch size, or n without ghost batches
    (or when the ghost batch is the whole batch). Raises ValueError when n does not split into ghost batches."""
    if ghost_batch_size is None or ghost_batch_size >= n:
        return n
    if n % ghost_batch_size:
        raise ValueError(
            f"batch of {n} samples does not split into ghost batches of {ghost_batch_size}; "
            "use a batch size that is a multiple of the ghost batch size (e.g. drop_last=True in the DataLoader)"
        )
    return ghost_batch_size


def check_sync_or_ghost(process_group: Optional[object], ghost_batch_size: Optional[int]) -> None:
    """Raise ValueError when both synchronised statistics and ghost batches are asked for."""
    if process_group is not None and ghost_batch_size is not None:
        raise ValueError("synchronised statistics and ghost batches exclude each other; set ghost_batch_size=None "
                         "or process_group=None")


def resolve_process_group(process_group: Optional[object]):
    """The torch.distributed group to synchronise over (True: the default group), or None."""
    if process_group is None:
        return None
    return dist.group.WORLD if process_group is True else process_group
