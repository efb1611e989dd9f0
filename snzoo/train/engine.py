"""The training loop: a recipe, data and torch.distributed in; a run directory with weights and an entry out.

Read top to bottom: set-up (processes, data, model, batch plan, optimiser, resume), then one loop over epochs
and steps, then the end-of-epoch work (batch-average statistics, cross-rank averaging, validation,
checkpoint), then the export of the weights and a manifest-ready entry.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader

from snzoo.errors import OutputError, TrainingError
from snzoo._torch_utils import autocast, check_device
from snzoo.eval.engine import default_workers
from snzoo.nn import (
    convert_sync_switchnorm,
    finalize_batch_average,
    set_ghost_batch_size,
    set_sparsestmax_radius,
    switchnorm_layers,
)
from snzoo.nn.batch_average import batch_average_layers
from snzoo.train._loss_window import LossWindow
from snzoo.train._tasks import Task, task_adapter
from snzoo.train.data import TrainData
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
from snzoo.train._run_entry import check_entry_name
from snzoo.train.micro_batches import StepStatistics
from snzoo.train.optim import build_optimizer, importance_parameters, set_learning_rate
from snzoo.train.plan import BatchPlan, TrainConfig, plan_batches, synchronised_statistics
from snzoo.train.recipe import peak_learning_rate, total_batch
from snzoo.train.run_log import RunLogger
from snzoo.train.sampler import GlobalBatchSampler
from snzoo.train.schedule import learning_rate, sparsestmax_radius
from snzoo.train.state import load_state, save_state, set_rng_states


def _progress(show: bool, total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, disable=not show)


def _frozen_modules(model: nn.Module, prefixes: tuple) -> list[nn.Module]:
    return [m for n, m in model.named_modules() if any(n == p or n.startswith(p + ".") for p in prefixes)]


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) training; returns the summary written to RUN_DIR/summary.json."""
    check_device(cfg.device)
    info = init_distributed(cfg.device)
    try:
        return _train(cfg, info)
    finally:
        shutdown(info)


@dataclass
class _Run:
    """The state of one run that every stage of the loop reads: set up once by `_prepare`."""

    cfg: TrainConfig
    info: DistInfo
    run_dir: Path
    log: Callable[[str], None]
    data: TrainData
    model: nn.Module
    net: nn.Module  # the model as stepped: DDP- and compile-wrapped where asked
    plan: BatchPlan
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    sampler: GlobalBatchSampler
    device: torch.device
    memory_format: torch.memory_format
    workers: int
    task: Task
    epochs: int  # the recipe's, or enough for its `iterations`
    last_step: Optional[int]  # the recipe's `iterations`, where it counts them
    step: int = 0
    logger: Optional[RunLogger] = None


def _train(cfg: TrainConfig, info: DistInfo) -> dict:
    run = _prepare(cfg, info)
    start_epoch, start_step_in_epoch = _resume(run) if cfg.resume else (0, 0)
    # Created only now, so bad input found above leaves no run directory behind.
    if info.is_main:
        try:
            run.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError.cannot_write(run.run_dir, exc) from None
    barrier(info)
    # A resumed run drops log lines past its checkpoint, so no step is logged twice.
    run.logger = RunLogger(run.run_dir, rank=info.rank, purge_step=run.step + 1 if cfg.resume else None)
    if not cfg.resume and info.is_main:
        (run.run_dir / "recipe.json").write_text(
            json.dumps({"name": cfg.name, "recipe": cfg.recipe, "run": _run_options(cfg, run.plan)}, indent=2) + "\n")
    epochs = run.epochs
    val_metrics: dict = {}
    stop = False
    epochs_done = start_epoch
    started = time.perf_counter()
    held = LossWindow(info)  # the losses of the steps since the last read
    for epoch in range(start_epoch, epochs):
        first = start_step_in_epoch if epoch == start_epoch else 0
        stop, steps_done = _train_epoch(run, epoch, first, held, started)
        if stop:
            _checkpoint(run, epoch, first + steps_done)
            break
        val_metrics = _end_of_epoch(run, epoch)
        epochs_done = epoch + 1
        _checkpoint(run, epochs_done, 0)
        if run.last_step is not None and run.step >= run.last_step:
            break  # the recipe's iterations are done (the last epoch may end early)
    # The exported weights hold the statistics averaged over ranks, whatever validation used.
    average_running_stats(run.model, info)
    summary = {"steps": run.step, "epochs_done": epochs_done, "stopped_early": stop,
               "val": val_metrics, "seconds": time.perf_counter() - started, "plan": run.plan.description}
    if info.is_main:
        summary.update(run.task.export(run.run_dir, run.model, cfg, run.data, val_metrics))
        (run.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        run.log(_done_line(summary))
    run.logger.close()
    return summary


def _prepare(cfg: TrainConfig, info: DistInfo) -> _Run:
    """Processes, data, model, batch plan, optimiser: everything before the first step."""
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

    task = task_adapter(cfg.task)
    data = task.build_data(cfg)
    sync_stats = synchronised_statistics(recipe, cfg.sync_stats)
    plan = plan_batches(recipe, info.world_size, cfg.accum_steps, sync_stats)
    # Before the model: too little data must fail before pretrained weights are fetched.
    sampler = GlobalBatchSampler(len(data.train), plan.global_batch, info.rank, info.world_size, seed=cfg.seed)
    num_classes = cfg.num_classes or data.num_classes
    model = task.build_model(cfg, num_classes, log)
    log(plan.description)
    if plan.ghost:
        set_ghost_batch_size(task.ghost_scope(model), plan.ghost)
    if sync_stats and info.enabled:
        convert_sync_switchnorm(model)
    device = torch.device(info.device)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model.to(device=device, memory_format=memory_format)
    # Buffers stay per device (broadcasting rank 0's would not be the original's unsynchronised statistics);
    # they are averaged over ranks before export, and before validation where the recipe asks for it.
    net = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False) if info.enabled else model
    if cfg.compile:
        net = torch.compile(net)
    iterations = recipe.get("iterations")
    epochs = math.ceil(iterations / sampler.steps_per_epoch) if iterations else recipe["epochs"]
    return _Run(cfg=cfg, info=info, run_dir=run_dir, log=log, data=data, model=model, net=net, plan=plan,
                task=task, epochs=epochs, last_step=iterations,
                optimizer=build_optimizer(model, recipe),
                scaler=torch.amp.GradScaler(device.type, enabled=cfg.amp == "float16"), sampler=sampler,
                device=device, memory_format=memory_format,
                workers=default_workers() if cfg.workers is None else cfg.workers)


def _resume(run: _Run) -> tuple[int, int]:
    """Load the run checkpoint into the model, optimiser, scaler and RNGs; returns (epoch, step in epoch)."""
    state = load_state(run.run_dir)
    if state is None:
        raise TrainingError(f"--resume: no run checkpoint in {run.run_dir}; start without --resume")
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scaler.load_state_dict(state["scaler"])
    run.step = state["step"]
    # Each rank continues from its own running statistics; the model's are rank 0's.
    if run.info.enabled and not restore_running_stats(run.model, state.get("rank_running_stats", torch.zeros(0)),
                                                      run.info):
        run.log(f"the checkpoint holds no running statistics for {run.info.world_size} ranks: every rank resumes "
                "from rank 0's")
    set_rng_states(state["rng"])
    run.log(f"resumed from {run.run_dir / 'state.pt'} at epoch {state['epoch']}, step {state['step_in_epoch']} of "
            f"{run.sampler.steps_per_epoch}")
    return state["epoch"], state["step_in_epoch"]


def _train_epoch(run: _Run, epoch: int, first: int, held: LossWindow, started: float) -> tuple[bool, int]:
    """The steps of one epoch from step `first`; returns (stopped at --max-steps, steps run)."""
    cfg, recipe, data, model, sampler = run.cfg, run.cfg.recipe, run.data, run.model, run.sampler
    epochs, steps_per_epoch = run.epochs, sampler.steps_per_epoch
    final_epochs = ((recipe["augmentation"] or {}).get("final_phase") or {}).get("epochs", 0)
    sampler.set_epoch(epoch, first)
    data.train.set_epoch(epoch)
    data.train.set_transform(data.final_transform if epoch >= epochs - final_epochs and data.final_transform
                             else data.train_transform)
    # Its own generator: creating a loader must not draw from the global RNG that dropout uses, or a
    # resumed run would drift from an uninterrupted one (augmentation is seeded per sample anyway).
    loader = DataLoader(data.train, batch_sampler=sampler, num_workers=run.workers, collate_fn=data.collate,
                        pin_memory=run.device.type == "cuda", generator=torch.Generator().manual_seed(cfg.seed))
    model.train()
    for module in _frozen_modules(model, cfg.freeze):
        module.eval()
    show_progress = run.info.is_main and (cfg.progress if cfg.progress is not None else sys.stderr.isatty())
    bar = _progress(show_progress, len(sampler), f"epoch {epoch}")
    peak = peak_learning_rate(recipe)
    is_ssn = bool(recipe.get("sparsestmax"))
    stop, steps_run = False, 0
    for step_in_epoch, (images, labels, _) in enumerate(loader, start=first):
        lr = learning_rate(recipe["schedule"], peak, epoch, step_in_epoch, steps_per_epoch, epochs, run.last_step)
        set_learning_rate(run.optimizer, lr)
        if is_ssn:
            set_sparsestmax_radius(model, sparsestmax_radius(epoch, step_in_epoch, steps_per_epoch, epochs))
        held.add(_forward_backward(run, images, labels), epoch, step_in_epoch, lr)
        log_now = (run.step + 1) % cfg.log_every == 0 or step_in_epoch == steps_per_epoch - 1
        checkpoint_now = bool(cfg.checkpoint_every) and (run.step + 1) % cfg.checkpoint_every == 0 \
            and step_in_epoch + 1 < steps_per_epoch
        stop = bool(cfg.max_steps) and run.step + 1 >= cfg.max_steps
        last = run.last_step is not None and run.step + 1 >= run.last_step
        # Losses are read (and checked) where they are logged and before any checkpoint, so none is written
        # after a non-finite loss; the sparsestmax forward cannot run on non-finite importance weights (and
        # reads them on the host every step anyway), so SSN runs read every step.
        log_now = log_now or last
        if is_ssn or log_now or checkpoint_now or stop:
            loss_value = _read_losses(held, run.run_dir)[-1]
        _optimizer_step(run)
        run.step += 1
        steps_run += 1
        bar.update(1)
        if log_now:
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.4g}")
            run.logger.log(run.step, "train", epoch=epoch, loss=loss_value, lr=lr,
                           images_per_s=run.step * run.plan.global_batch / (time.perf_counter() - started))
        if checkpoint_now:
            _checkpoint(run, epoch, step_in_epoch + 1)
        if stop or last:
            break
    bar.close()
    return stop, steps_run


def _forward_backward(run: _Run, inputs, targets) -> torch.Tensor:
    """Forward and backward over the step's micro-batches; returns the step's mean loss, left on the device."""
    inputs, targets = run.task.to_device(inputs, targets, run.device, run.memory_format)
    loss_sum = torch.zeros((), device=run.device)
    micro = run.task.split(inputs, targets, run.plan.accum_steps)
    step_statistics = StepStatistics(run.model, len(micro)) if len(micro) > 1 else None
    for i, (x, y) in enumerate(micro):
        last = i == len(micro) - 1
        sync = contextlib.nullcontext() if last or not run.info.enabled else run.net.no_sync()
        with sync, autocast(run.device, run.cfg.amp):
            loss = run.task.loss(run.net, x, y, run.cfg.recipe)
        run.scaler.scale(loss / len(micro)).backward()
        loss_sum += loss.detach() / len(micro)
        if step_statistics:
            step_statistics.micro_batch_done(last=last)
    return loss_sum


def _optimizer_step(run: _Run) -> None:
    clip = (run.cfg.recipe.get("sparsestmax") or {}).get("grad_clip_norm")
    if clip:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(importance_parameters(run.optimizer), clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)


def _checkpoint(run: _Run, epoch: int, step_in_epoch: int) -> None:
    """Save the run state (rank 0), unless a step has turned the weights non-finite while its loss was finite."""
    model = run.model
    finite = all(bool(torch.isfinite(t).all()) for t in model.state_dict().values() if t.is_floating_point())
    if not all_finite(torch.tensor(1.0 if finite else float("nan")), run.info):
        raise TrainingError(f"non-finite weights or statistics after step {run.step}; stopped, "
                            f"{_last_good(run.run_dir)}; lower the learning rate")
    rank_running_stats = gather_running_stats(model, run.info)
    if run.info.is_main:
        save_state(run.run_dir, model=model.state_dict(), optimizer=run.optimizer.state_dict(),
                   scaler=run.scaler.state_dict(), epoch=epoch, step_in_epoch=step_in_epoch, step=run.step,
                   rank_running_stats=rank_running_stats)


def _last_good(run_dir: Path) -> str:
    """Where a stopped run can go on from, for the error that stops it."""
    last = load_state(run_dir)
    return f"the last good checkpoint is {run_dir / 'state.pt'} (step {last['step']})" if last else \
        "no checkpoint was written yet"


def _read_losses(held: LossWindow, run_dir: Path) -> list[float]:
    """The held losses as floats; a non-finite one stops the run, reported at its own step."""
    read = held.read()
    if read.first_non_finite is None:
        return read.values
    at, value = read.steps[read.first_non_finite], read.values[read.first_non_finite]
    raise TrainingError(f"non-finite loss ({value}) at epoch {at.epoch}, step {at.step_in_epoch} "
                        f"(lr {at.lr:.4g}); stopped, {_last_good(run_dir)}; lower the learning rate or check the data")


def _end_of_epoch(run: _Run, epoch: int) -> dict:
    """Batch-average statistics where the recipe keeps them, then validation on rank 0: with the running
    statistics averaged over ranks where the recipe sets average_running_stats_before_eval, else with rank 0's own
    (as the original validated; the ranks then keep training with their own)."""
    model, data, recipe, info, plan, device, workers = (run.model, run.data, run.cfg.recipe, run.info, run.plan,
                                                        run.device, run.workers)
    step, logger, log = run.step, run.logger, run.log
    batch_average = recipe.get("batch_average")
    if batch_average and batch_average_layers(model) and data.train_eval is not None:
        loader = DataLoader(data.train_eval, batch_size=plan.process_batch, shuffle=True, num_workers=workers,
                            drop_last=True, generator=torch.Generator().manual_seed(epoch))
        used = finalize_batch_average(model, (b[0].to(device) for b in loader), batch_average.get("iterations", 200))
        log(f"epoch {epoch}: batch-average statistics over {used} batches")
    if recipe.get("average_running_stats_before_eval", False):
        average_running_stats(model, info)
    metrics = {}
    if info.is_main and data.val is not None:
        validation = run.task.validate(model, data, plan.micro_batch, workers, device)
        metrics = validation.metrics
        logger.log(step, "val", epoch=epoch, **validation.scalars)
        if switchnorm_layers(model):
            logger.log_importance(step, model)
        log(f"epoch {epoch}: {validation.line}")
    barrier(info)
    return metrics


def _run_options(cfg: TrainConfig, plan: BatchPlan) -> dict:
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items() if k != "recipe"}
    options["sync_stats"] = synchronised_statistics(cfg.recipe, cfg.sync_stats)
    options["plan"] = plan.description
    options["peak_lr"] = peak_learning_rate(cfg.recipe)
    options["total_batch"] = total_batch(cfg.recipe)
    return options


__all__ = ["TrainConfig", "BatchPlan", "plan_batches", "synchronised_statistics", "train"]


def _done_line(summary: dict) -> str:
    """The run's last log line: what was done (steps, epochs, why it stopped), the validation metrics where an epoch
    ended, and where the weights are."""
    done = f"{summary['steps']} steps, {summary['epochs_done']} epochs"
    if summary["stopped_early"]:
        done += " (stopped at --max-steps)"
    val = summary.get("val")
    metrics = ", ".join(_metric_text(k, v) for k, v in val.items() if not isinstance(v, list)) if val else (
        "no validation (no epoch ended)")
    return f"done: {done}; {metrics} -> {summary.get('weights')}"


def _metric_text(name: str, value) -> str:
    if isinstance(value, dict):  # COCO statistics: AP stands for them
        return f"{name} AP {value['AP']:.2f}" if "AP" in value else name
    return f"{name} {value:.2f}" if isinstance(value, float) else f"{name} {value}"
