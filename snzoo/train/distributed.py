"""torch.distributed set-up for torchrun launches, and the collective steps the recipes need."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from snzoo.nn.switchnorm import _SwitchNorm


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "cpu") -> DistInfo:
    """Join the process group that torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK): nccl on GPUs, gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return DistInfo(rank, world_size, local_rank, device)


def running_stat_buffers(model: nn.Module) -> list[torch.Tensor]:
    """Running statistics of SN and BN layers (not counters such as num_batches_tracked)."""
    buffers = []
    for module in model.modules():
        if isinstance(module, (_SwitchNorm, nn.modules.batchnorm._BatchNorm)):
            for name in ("running_mean", "running_var"):
                value = getattr(module, name, None)
                if value is not None:
                    buffers.append(value)
    return buffers


@torch.no_grad()
def average_running_stats(model: nn.Module, info: DistInfo) -> None:
    """Average per-device running statistics over ranks (what ghost-batch emulation holds on one process)."""
    if not info.enabled:
        return
    for buffer in running_stat_buffers(model):
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
        buffer.div_(info.world_size)


@torch.no_grad()
def gather_running_stats(model: nn.Module, info: DistInfo) -> torch.Tensor:
    """Every rank's running statistics as one row per rank (world_size x values), on the CPU: a run whose ranks
    keep their own statistics needs each rank's in its checkpoint, not only rank 0's."""
    buffers = running_stat_buffers(model)
    # float64 holds float32 and float64 buffers exactly.
    flat = torch.cat([b.detach().flatten().double() for b in buffers] or [torch.zeros(0, dtype=torch.float64)])
    if not info.enabled:
        return flat.unsqueeze(0).cpu()
    rows = [torch.empty_like(flat) for _ in range(info.world_size)]
    dist.all_gather(rows, flat)
    return torch.stack(rows).cpu()


@torch.no_grad()
def restore_running_stats(model: nn.Module, per_rank: torch.Tensor, info: DistInfo) -> bool:
    """Load this rank's row of gather_running_stats into the model; False (nothing changed) when the checkpoint
    was written by a different number of ranks or for other layers."""
    buffers = running_stat_buffers(model)
    if per_rank.shape != (info.world_size, sum(b.numel() for b in buffers)):
        return False
    offset = 0
    for buffer in buffers:
        buffer.copy_(per_rank[info.rank, offset:offset + buffer.numel()].view_as(buffer))
        offset += buffer.numel()
    return True


def all_finite(value: torch.Tensor, info: DistInfo) -> bool:
    """True when the value is finite on every rank (so all ranks stop together)."""
    return finite_on_every_rank(torch.isfinite(value).all().reshape(1), info)[0]


def finite_on_every_rank(finite: torch.Tensor, info: DistInfo) -> list[bool]:
    """Per element of the 1-d boolean `finite` (this rank's finiteness flags): true on every rank (one all-reduce)."""
    flags = finite.to(torch.float32)
    if info.enabled:
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    return [flag == 1.0 for flag in flags.tolist()]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
