"""Real multi-process runs for the distributed tests: torch.multiprocessing.spawn with a deadline."""

from __future__ import annotations

import time
from typing import Callable

import pytest
import torch.multiprocessing as mp


def spawn_and_wait(worker: Callable, args: tuple, nprocs: int, timeout_s: float, what: str) -> None:
    """Run worker(rank, *args) in nprocs processes and wait for all of them; fail the test (killing the rest) when
    one raises or when they are not done within timeout_s."""
    ctx = mp.spawn(worker, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"the {nprocs} {what} processes did not finish within {timeout_s} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)
