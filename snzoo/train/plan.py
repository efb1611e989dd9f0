"""What a run is asked to do (TrainConfig) and how the recipe's devices map onto the processes (BatchPlan)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from snzoo.errors import TrainingError


@dataclass
class TrainConfig:
    """Everything a run needs besides the recipe's own settings."""

    name: str  # a zoo entry (ARCH.TAG) or an architecture
    recipe: dict
    data: str
    output: Path
    model_overrides: dict = field(default_factory=dict)
    init: Optional[str] = None  # a zoo entry or checkpoint to start from (fine-tuning)
    device: str = "cpu"
    workers: Optional[int] = None
    seed: int = 0
    amp: Optional[str] = None
    channels_last: bool = False
    compile: bool = False
    accum_steps: int = 1
    sync_stats: Optional[bool] = None  # None: as the recipe's `statistics` says
    checkpoint_every: int = 0
    resume: bool = False
    max_steps: Optional[int] = None
    subset: Optional[int] = None
    val_subset: Optional[int] = None
    deterministic: bool = False
    freeze: tuple = ()
    reset_importance: bool = False
    reopen_ssn: bool = False  # re-open fixed one-hot SSN importance weights (snzoo.nn.reopen_sparse_switchnorm)
    drop_bn: Optional[bool] = None
    num_classes: Optional[int] = None
    log_every: int = 10
    progress: Optional[bool] = None
    entry_name: Optional[str] = None  # the name to give the trained weights in entry.json
    task: str = "classification"  # or "detection", "segmentation": `name` is then the task model's builder
    backbone: Optional[str] = None  # task models: the backbone entry or architecture (`init` may be its checkpoint)


@dataclass(frozen=True)
class BatchPlan:
    """How the recipe's (devices x per-device) batch maps onto the processes at hand."""

    global_batch: int
    process_batch: int
    micro_batch: int
    accum_steps: int
    ghost: Optional[int]
    description: str


def synchronised_statistics(recipe: dict, sync_stats: Optional[bool] = None) -> bool:
    """Whether the run synchronises the statistics over processes: `sync_stats` when given (--sync-stats or
    --no-sync-stats), else the recipe's `statistics` (`synchronized`, or the default `per_device`)."""
    if sync_stats is not None:
        return sync_stats
    return recipe.get("statistics", "per_device") == "synchronized"


def plan_batches(recipe: dict, world_size: int, accum_steps: int = 1, sync_stats: bool = False) -> BatchPlan:
    """Emulate the recipe's devices: each process runs devices / world_size of them as ghost batches."""
    devices, per_device = recipe["batch"]["devices"], recipe["batch"]["per_device"]
    if devices % world_size:
        raise TrainingError(f"the recipe's {devices} devices do not split over {world_size} processes; "
                            f"launch a divisor of {devices} processes")
    emulated = devices // world_size
    if not (isinstance(accum_steps, int) and accum_steps >= 1):
        raise TrainingError(f"--accum-steps must be a positive integer, got {accum_steps!r}")
    if emulated % accum_steps:
        raise TrainingError(f"--accum-steps {accum_steps} must divide the {emulated} devices each process emulates "
                            "(micro-batches hold whole devices, so the statistics stay per device)")
    process_batch = emulated * per_device
    ghost = per_device if emulated > 1 and not sync_stats else None
    if sync_stats:
        stats = f"statistics synchronised over all {devices * per_device} images"
        if emulated > 1:
            raise TrainingError("synchronised statistics (--sync-stats, or the recipe's statistics: synchronized) "
                                f"need one process per recipe device; launch {devices} processes or pass "
                                "--no-sync-stats")
    elif ghost:
        stats = f"BN statistics over ghost batches of {per_device} ({emulated} emulated devices per process)"
    else:
        stats = f"BN statistics per process of {per_device} images, not synchronised"
    text = (f"recipe {devices}x{per_device} on {world_size} process(es): {process_batch} images per process and step, "
            f"{stats}" + (f", gradient accumulation over {accum_steps} micro-batches" if accum_steps > 1 else ""))
    return BatchPlan(devices * per_device, process_batch, process_batch // accum_steps, accum_steps, ghost, text)
