"""The training loop: a recipe, data and torch.distributed in; a run directory with weights and an entry out.

Read top to bottom: set-up (processes, data, model, batch plan, optimiser, resume), then one loop over epochs
and steps, then the end-of-epoch work (batch-average statistics, cross-rank averaging, validation,
checkpoint), then the export of the weights and a manifest-ready entry.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from snzoo.errors import OutputError, TrainingError
from snzoo.evaluate import check_device, default_workers, evaluate
from snzoo.nn import (
    convert_sync_switchnorm,
    finalize_batch_average,
    set_ghost_batch_size,
    set_sparsestmax_radius,
    switchnorm_layers,
)
from snzoo.nn.batch_average import batch_average_layers
from snzoo.train._loss_window import LossWindow
from snzoo.train._model import build_model, input_format
from snzoo.train.data import TrainData, build_train_data
from snzoo.train.distributed import (
    DistInfo,
    all_finite,
    average_running_stats,
    barrier,
    gather_running_stats,
    init_distributed,
    restore_running_stats,
    shutdown,
)
from snzoo.train.export import check_entry_name, export_run
from snzoo.train.micro_batches import StepStatistics
from snzoo.train.optim import build_optimizer, importance_parameters, set_learning_rate
from snzoo.train.recipe import peak_learning_rate, total_batch
from snzoo.train.run_log import RunLogger
from snzoo.train.sampler import GlobalBatchSampler
from snzoo.train.schedule import learning_rate, sparsestmax_radius
from snzoo.train.state import load_state, save_state, set_rng_states


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
    drop_bn: Optional[bool] = None
    num_classes: Optional[int] = None
    log_every: int = 10
    progress: Optional[bool] = None
    entry_name: Optional[str] = None  # the name to give the trained weights in entry.json


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


def _progress(show: bool, total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, disable=not show)


def _frozen_modules(model: nn.Module, prefixes: tuple) -> list[nn.Module]:
    return [m for n, m in model.named_modules() if any(n == p or n.startswith(p + ".") for p in prefixes)]


def _split(tensor: torch.Tensor, parts: int) -> list[torch.Tensor]:
    return list(tensor.chunk(parts)) if parts > 1 else [tensor]


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) training; returns the summary written to RUN_DIR/summary.json."""
    check_device(cfg.device)
    info = init_distributed(cfg.device)
    try:
        return _train(cfg, info)
    finally:
        shutdown(info)


def _train(cfg: TrainConfig, info: DistInfo) -> dict:
    recipe = cfg.recipe
    run_dir = Path(cfg.output)
    if cfg.entry_name is not None:
        check_entry_name(cfg.entry_name)
    # Progress goes to stderr, so stdout carries only what the command reports (e.g. --json).
    log = (lambda msg: print(f"[snzoo train] {msg}", file=sys.stderr, flush=True)) if info.is_main else (lambda msg: None)
    torch.manual_seed(cfg.seed)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False

    in_chans, normalization = input_format(cfg)
    data: TrainData = build_train_data(cfg.data, recipe, seed=cfg.seed, subset=cfg.subset, val_subset=cfg.val_subset,
                                       in_chans=in_chans, normalization=normalization)
    sync_stats = synchronised_statistics(recipe, cfg.sync_stats)
    plan = plan_batches(recipe, info.world_size, cfg.accum_steps, sync_stats)
    # Before the model: too little data must fail before pretrained weights are fetched.
    sampler = GlobalBatchSampler(len(data.train), plan.global_batch, info.rank, info.world_size, seed=cfg.seed)
    num_classes = cfg.num_classes or data.num_classes
    model = build_model(cfg, num_classes, log)
    log(plan.description)
    if plan.ghost:
        set_ghost_batch_size(model, plan.ghost)
    if sync_stats and info.enabled:
        convert_sync_switchnorm(model)
    device = torch.device(info.device)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model.to(device=device, memory_format=memory_format)
    optimizer = build_optimizer(model, recipe)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "float16")
    clip = (recipe.get("sparsestmax") or {}).get("grad_clip_norm")
    is_ssn = bool(recipe.get("sparsestmax"))
    # Buffers stay per device (broadcasting rank 0's would not be the original's unsynchronised statistics);
    # they are averaged over ranks before export, and before validation where the recipe asks for it.
    net = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False) if info.enabled else model
    if cfg.compile:
        net = torch.compile(net)

    steps_per_epoch = sampler.steps_per_epoch
    epochs = recipe["epochs"]
    peak = peak_learning_rate(recipe)
    final_epochs = ((recipe["augmentation"] or {}).get("final_phase") or {}).get("epochs", 0)
    start_epoch, start_step_in_epoch, step = 0, 0, 0
    if cfg.resume:
        state = load_state(run_dir)
        if state is None:
            raise TrainingError(f"--resume: no run checkpoint in {run_dir}; start without --resume")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, start_step_in_epoch, step = state["epoch"], state["step_in_epoch"], state["step"]
        # Each rank continues from its own running statistics; the model's are rank 0's.
        if info.enabled and not restore_running_stats(model, state.get("rank_running_stats", torch.zeros(0)), info):
            log(f"the checkpoint holds no running statistics for {info.world_size} ranks: every rank resumes "
                "from rank 0's")
        set_rng_states(state["rng"])
        log(f"resumed from {run_dir / 'state.pt'} at epoch {start_epoch}, step {start_step_in_epoch} of {steps_per_epoch}")
    # Created only now, so bad input found above leaves no run directory behind.
    if info.is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError.cannot_write(run_dir, exc) from None
    barrier(info)
    # A resumed run drops log lines past its checkpoint, so no step is logged twice.
    logger = RunLogger(run_dir, rank=info.rank, purge_step=step + 1 if cfg.resume else None)
    if not cfg.resume and info.is_main:
        (run_dir / "recipe.json").write_text(json.dumps({"name": cfg.name, "recipe": recipe, "run": _run_options(cfg, plan)}, indent=2) + "\n")

    def checkpoint(epoch: int, step_in_epoch: int) -> None:
        # A step can turn the weights non-finite while its own loss was finite: never save such a state.
        finite = all(bool(torch.isfinite(t).all()) for t in model.state_dict().values() if t.is_floating_point())
        if not all_finite(torch.tensor(1.0 if finite else float("nan")), info):
            last = load_state(run_dir)
            kept = f"the last good checkpoint is {run_dir / 'state.pt'} (step {last['step']})" if last else "no checkpoint was written"
            raise TrainingError(f"non-finite weights or statistics after step {step}; stopped, {kept}; lower the learning rate")
        rank_running_stats = gather_running_stats(model, info)
        if info.is_main:
            save_state(run_dir, model=model.state_dict(), optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                       epoch=epoch, step_in_epoch=step_in_epoch, step=step, rank_running_stats=rank_running_stats)

    workers = default_workers() if cfg.workers is None else cfg.workers
    show_progress = info.is_main and (cfg.progress if cfg.progress is not None else sys.stderr.isatty())
    autocast = (torch.autocast(device.type, dtype=torch.float16 if cfg.amp == "float16" else torch.bfloat16)
                if cfg.amp else contextlib.nullcontext())
    val_metrics: dict = {}
    stop = False
    held = LossWindow(info)  # the losses of the steps since the last read
    epochs_done = start_epoch
    started = time.perf_counter()
    for epoch in range(start_epoch, epochs):
        first = start_step_in_epoch if epoch == start_epoch else 0
        sampler.set_epoch(epoch, first)
        data.train.set_epoch(epoch)
        data.train.set_transform(data.final_transform if epoch >= epochs - final_epochs and data.final_transform else data.train_transform)
        # Its own generator: creating a loader must not draw from the global RNG that dropout uses, or a
        # resumed run would drift from an uninterrupted one (augmentation is seeded per sample anyway).
        loader = DataLoader(data.train, batch_sampler=sampler, num_workers=workers, pin_memory=device.type == "cuda",
                            generator=torch.Generator().manual_seed(cfg.seed))
        model.train()
        for module in _frozen_modules(model, cfg.freeze):
            module.eval()
        bar = _progress(show_progress, len(sampler), f"epoch {epoch}")
        for step_in_epoch, (images, labels, _) in enumerate(loader, start=first):
            lr = learning_rate(recipe["schedule"], peak, epoch, step_in_epoch, steps_per_epoch, epochs)
            set_learning_rate(optimizer, lr)
            if is_ssn:
                set_sparsestmax_radius(model, sparsestmax_radius(epoch, step_in_epoch, steps_per_epoch, epochs))
            images = images.to(device, non_blocking=True, memory_format=memory_format)
            labels = labels.to(device, non_blocking=True)
            loss_sum = torch.zeros((), device=device)
            micro = list(zip(_split(images, plan.accum_steps), _split(labels, plan.accum_steps)))
            step_statistics = StepStatistics(model, len(micro)) if len(micro) > 1 else None
            for i, (x, y) in enumerate(micro):
                sync = contextlib.nullcontext() if i == len(micro) - 1 or not info.enabled else net.no_sync()
                with sync, autocast:
                    loss = F.cross_entropy(net(x), y, label_smoothing=recipe.get("label_smoothing", 0.0))
                scaler.scale(loss / len(micro)).backward()
                loss_sum += loss.detach() / len(micro)
                if step_statistics:
                    step_statistics.micro_batch_done(last=i == len(micro) - 1)
            held.add(loss_sum, epoch, step_in_epoch, lr)
            log_now = (step + 1) % cfg.log_every == 0 or step_in_epoch == steps_per_epoch - 1
            checkpoint_now = bool(cfg.checkpoint_every) and (step + 1) % cfg.checkpoint_every == 0 \
                and step_in_epoch + 1 < steps_per_epoch
            stop = bool(cfg.max_steps) and step + 1 >= cfg.max_steps
            # Losses are read (and checked) where they are logged and before any checkpoint, so none is written
            # after a non-finite loss; the sparsestmax forward cannot run on non-finite importance weights (and
            # reads them on the host every step anyway), so SSN runs read every step.
            if is_ssn or log_now or checkpoint_now or stop:
                loss_value = _read_losses(held, run_dir)[-1]
            if clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(importance_parameters(optimizer), clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            if log_now:
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.4g}")
                logger.log(step, "train", epoch=epoch, loss=loss_value, lr=lr,
                           images_per_s=step * plan.global_batch / (time.perf_counter() - started))
            if checkpoint_now:
                checkpoint(epoch, step_in_epoch + 1)
            if stop:
                break
        bar.close()
        if stop:
            checkpoint(epoch, step_in_epoch + 1)
            break
        val_metrics = _end_of_epoch(model, data, recipe, info, plan, device, workers, epoch, step, logger, log)
        epochs_done = epoch + 1
        checkpoint(epochs_done, 0)
    # The exported weights hold the statistics averaged over ranks, whatever validation used.
    average_running_stats(model, info)
    summary = {"steps": step, "epochs_done": epochs_done, "stopped_early": stop,
               "val": val_metrics, "seconds": time.perf_counter() - started, "plan": plan.description}
    if info.is_main:
        summary.update(export_run(run_dir, model, cfg, data, val_metrics))
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        log(_done_line(summary))
    logger.close()
    return summary


def _read_losses(held: LossWindow, run_dir: Path) -> list[float]:
    """The held losses as floats; a non-finite one stops the run, reported at its own step."""
    read = held.read()
    if read.first_non_finite is None:
        return read.values
    at, value = read.steps[read.first_non_finite], read.values[read.first_non_finite]
    last = load_state(run_dir)
    kept = f"the last good checkpoint is {run_dir / 'state.pt'} (step {last['step']})" if last else "no checkpoint was written yet"
    raise TrainingError(f"non-finite loss ({value}) at epoch {at.epoch}, step {at.step_in_epoch} "
                        f"(lr {at.lr:.4g}); stopped, {kept}; lower the learning rate or check the data")


def _end_of_epoch(model, data, recipe, info, plan, device, workers, epoch, step, logger, log) -> dict:
    """Batch-average statistics where the recipe keeps them, then validation on rank 0: with the running
    statistics averaged over ranks where the recipe sets average_running_stats_before_eval, else with rank 0's own
    (as the original validated; the ranks then keep training with their own)."""
    batch_average = recipe.get("batch_average")
    if batch_average and batch_average_layers(model):
        loader = DataLoader(data.train_eval, batch_size=plan.process_batch, shuffle=True, num_workers=workers,
                            drop_last=True, generator=torch.Generator().manual_seed(epoch))
        used = finalize_batch_average(model, (b[0].to(device) for b in loader), batch_average.get("iterations", 200))
        log(f"epoch {epoch}: batch-average statistics over {used} batches")
    if recipe.get("average_running_stats_before_eval", False):
        average_running_stats(model, info)
    metrics = {}
    if info.is_main and data.val is not None:
        result = evaluate(model, data.val, batch_size=max(plan.micro_batch, 64), workers=workers, device=device,
                          progress=False, name="val")
        metrics = {"dataset": data.val_name, "top1": result.top1, "top5": result.top5, "n": result.n}
        logger.log(step, "val", epoch=epoch, top1=result.top1, top5=result.top5)
        if switchnorm_layers(model):
            logger.log_importance(step, model)
        log(f"epoch {epoch}: val top-1 {result.top1:.2f} top-5 {result.top5:.2f} ({result.n} images)")
    barrier(info)
    return metrics


def _run_options(cfg: TrainConfig, plan: BatchPlan) -> dict:
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items() if k != "recipe"}
    options["sync_stats"] = synchronised_statistics(cfg.recipe, cfg.sync_stats)
    options["plan"] = plan.description
    options["peak_lr"] = peak_learning_rate(cfg.recipe)
    options["total_batch"] = total_batch(cfg.recipe)
    return options


__all__ = ["TrainConfig", "TrainingError", "BatchPlan", "plan_batches", "synchronised_statistics", "train"]


def _done_line(summary: dict) -> str:
    """The run's last log line: what was done (steps, epochs, why it stopped), the validation metrics where an epoch
    ended, and where the weights are."""
    done = f"{summary['steps']} steps, {summary['epochs_done']} epochs"
    if summary["stopped_early"]:
        done += " (stopped at --max-steps)"
    val = summary.get("val")
    metrics = ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in val.items()) if val else (
        "no validation (no epoch ended)")
    return f"done: {done}; {metrics} -> {summary.get('weights')}"
