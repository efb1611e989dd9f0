"""Training options that must not change what a run computes, checked against an eager float32 run.

`--compile`, `--channels-last` and `--amp bfloat16` are speed options: the same seed, data and recipe give the
eager float32 run's loss curve and weights, `--compile` and `--channels-last` to float32 rounding and bfloat16
to bfloat16 rounding. `--accum-steps` splits a step into micro-batches of whole emulated devices, so every BN
statistic is still taken over one device's images: the run equals the one that takes the full batch in one step,
on one process and under torchrun (where DDP all-reduces the gradients once per step, at the last micro-batch).

Every run is `snzoo train` with every step logged: single-process runs in this process (CliRunner), so the
tests can watch the model the run builds; torchrun runs as `python -m snzoo.train` is run, behind a launcher
that counts DDP's gradient all-reduces.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from snzoo.train import engine, launch
from snzoo_cli.main import cli

from test_train import RECIPE, weights

# Label smoothing adds a second loss term, so an option that drops it shows in the loss curve; no dropout,
# because compiled code draws its dropout masks from its own generator, not the eager run's.
EQUIVALENCE_RECIPE = {**copy.deepcopy(RECIPE), "label_smoothing": 0.1, "dropout": 0.0}
SEED, SUBSET, STEPS = 5, 48, 4  # 4 emulated devices x 2 images per step: 6 steps per epoch, 4 of them run

# Float32 rounding: the options reorder float32 sums (other conv kernels, fused graphs, micro-batch sums), which
# moved losses by <= 3e-7, weights by <= 7e-7 and running statistics by <= 2e-7 over 4 steps here; 1e-5 leaves
# room for other CPUs' kernels and stays far below what a dropped loss term, a wrong loss scale or micro-batches
# that are not whole devices do to them (>= 2e-3 on the losses).
FLOAT32_TOL = {"atol": 1e-5, "rtol": 1e-5}
# bfloat16 keeps 8 significant bits (relative rounding 2**-8 = 4e-3). Over 4 steps the loss moved by <= 5e-4,
# single weights by <= 4e-4 and running statistics by <= 1.6e-3 here; the bounds are 3-10x that, about one
# bfloat16 rounding of the values, and a dropped label-smoothing term moves the loss by 1.5e-2.
BF16_LOSS_ATOL = 5e-3
BF16_WEIGHT_TOL = {"atol": 4e-3, "rtol": 4e-3}
# |w_bf16 - w_fp32| / |w_fp32 - w_initial| over all parameters: 0.034 here, so bfloat16 rounding stays small
# next to what the 4 steps changed; 0.11 with the label-smoothing term dropped under autocast.
BF16_MAX_DRIFT_PER_UPDATE = 0.07


pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class Run:
    """What a training run left: its per-step losses, exported weights, and what was seen inside it."""

    losses: list[float]
    weights: dict[str, torch.Tensor]
    initial: dict[str, torch.Tensor] = field(default_factory=dict)  # the parameters before the first step
    seen: dict[str, object] = field(default_factory=dict)


def train_losses(run_dir: Path) -> list[float]:
    """The logged training loss of every step, in step order."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["split"] == "train"]


def recipe_path(directory: Path) -> Path:
    """The equivalence recipe as a `--recipe` file in directory."""
    path = directory / "equivalence-recipe.json"
    path.write_text(json.dumps(EQUIVALENCE_RECIPE))
    return path


def run_args(arch: str, recipe: Path, run_dir: Path, *flags: str) -> list[str]:
    """`snzoo train` arguments of the short equivalence run."""
    return [arch, "--recipe", str(recipe), "-o", str(run_dir), "--data", "fashion-mnist", "--subset", str(SUBSET),
            "--val-subset", "16", "--max-steps", str(STEPS), "-j", "0", "--seed", str(SEED), *flags]


def run_in_process(run_dir: Path, *flags: str, arch: str = "resnet20_sn", watch: bool = True) -> Run:
    """A short `snzoo train` run of the equivalence recipe in this process, every step logged.

    watch=True registers hooks on the run's model (when the engine has built its optimizer, i.e. after the model
    was moved to its device and memory format) that record the layout of the first input to layer1 and the
    dtype of conv1's output. Layouts are read at 16 channels: a 1-channel image is channels-last either way.
    """
    run = Run([], {})
    build = engine.build_optimizer

    def build_and_watch(model, recipe):
        run.initial = {name: p.detach().clone() for name, p in model.named_parameters()}
        conv_weights = [p for p in model.parameters() if p.dim() == 4 and p.shape[1] > 1]
        channels_last = [p.is_contiguous(memory_format=torch.channels_last) for p in conv_weights]
        run.seen["weights_channels_last"] = all(channels_last)
        if watch:
            def first_activation(module, args):
                run.seen.setdefault("activations_channels_last",
                                    args[0].is_contiguous(memory_format=torch.channels_last))

            def first_conv_output(module, args, output):
                run.seen.setdefault("conv1_output_dtype", output.dtype)

            model.layer1.register_forward_pre_hook(first_activation)
            model.conv1.register_forward_hook(first_conv_output)
        return build(model, recipe)

    run_dir.parent.mkdir(parents=True, exist_ok=True)
    args = run_args(arch, recipe_path(run_dir.parent), run_dir, *flags)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine, "build_optimizer", build_and_watch)
        patch.setattr(launch, "train", lambda cfg: engine.train(dataclasses.replace(cfg, log_every=1)))
        result = CliRunner().invoke(cli, ["train", *args])
    assert result.exit_code == 0, result.output
    run.losses, run.weights = train_losses(run_dir), weights(run_dir)
    return run


@pytest.fixture(scope="module")
def eager(tmp_path_factory) -> Run:
    """The reference: eager, float32, contiguous, the whole batch in one step."""
    return run_in_process(tmp_path_factory.mktemp("eager") / "run")


def assert_same_losses(losses: list[float], reference: list[float], atol: float, rtol: float = 0.0) -> None:
    assert len(losses) == len(reference) == STEPS
    assert losses == pytest.approx(reference, abs=atol, rel=rtol)


def assert_same_weights(state: dict, reference: dict, atol: float, rtol: float) -> None:
    """Every parameter and running statistic (and counter) of the two exported state dicts agree."""
    assert state.keys() == reference.keys()
    for key, value in state.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, reference[key], atol=atol, rtol=rtol,
                                       msg=lambda message, key=key: f"{key}: {message}")
        else:
            assert torch.equal(value, reference[key]), key


def assert_same_initial(run: Run, reference: Run) -> None:
    assert run.initial.keys() == reference.initial.keys()
    assert all(torch.equal(run.initial[n], reference.initial[n]) for n in run.initial)


def assert_trained(run: Run) -> None:
    """The steps changed the weights: equal runs must not be equal because nothing was trained."""
    moved = [name for name, p in run.initial.items() if not torch.equal(p, run.weights[name])]
    assert len(moved) > len(run.initial) // 2


def drift_per_update(run: Run, reference: Run) -> float:
    """|w_run - w_ref| / |w_ref - w_initial| over all parameters: the difference next to what training changed."""
    names = list(reference.initial)
    difference = torch.cat([(run.weights[n].float() - reference.weights[n].float()).flatten() for n in names])
    update = torch.cat([(reference.weights[n].float() - reference.initial[n].float()).flatten() for n in names])
    return float(difference.norm() / update.norm())


# ---------------------------------------------------------------------------------------------- speed options


def test_eager_reference_run_trains(eager):
    assert_trained(eager)
    assert eager.seen == {"weights_channels_last": False, "activations_channels_last": False,
                          "conv1_output_dtype": torch.float32}
    assert all(1.5 < loss < 3.5 for loss in eager.losses)  # near ln(10) for 10 classes after a few steps


def test_compile_matches_eager_float32(eager, tmp_path):
    from torch._dynamo.utils import counters

    counters.clear()
    try:
        # No hooks on the compiled model: dynamo would trace them.
        compiled = run_in_process(tmp_path / "run", "--compile", watch=False)
        assert counters["stats"]["unique_graphs"] > 0  # the forward really went through torch.compile
    finally:
        torch._dynamo.reset()
    assert_same_initial(compiled, eager)
    assert_same_losses(compiled.losses, eager.losses, **FLOAT32_TOL)
    assert_same_weights(compiled.weights, eager.weights, **FLOAT32_TOL)


def test_channels_last_matches_eager_float32(eager, tmp_path):
    channels_last = run_in_process(tmp_path / "run", "--channels-last")
    assert channels_last.seen == {"weights_channels_last": True, "activations_channels_last": True,
                                  "conv1_output_dtype": torch.float32}
    assert_same_initial(channels_last, eager)
    assert_same_losses(channels_last.losses, eager.losses, **FLOAT32_TOL)
    assert_same_weights(channels_last.weights, eager.weights, **FLOAT32_TOL)


def test_bfloat16_channels_last_matches_eager_float32_to_bfloat16_rounding(eager, tmp_path):
    bf16 = run_in_process(tmp_path / "run", "--amp", "bfloat16", "--channels-last")
    assert bf16.seen == {"weights_channels_last": True, "activations_channels_last": True,
                         "conv1_output_dtype": torch.bfloat16}
    assert_same_initial(bf16, eager)
    assert_same_losses(bf16.losses, eager.losses, atol=BF16_LOSS_ATOL)
    assert_same_weights(bf16.weights, eager.weights, **BF16_WEIGHT_TOL)
    assert all(v.dtype == torch.float32 for v in bf16.weights.values() if v.is_floating_point())  # master weights
    assert drift_per_update(bf16, eager) < BF16_MAX_DRIFT_PER_UPDATE


# ---------------------------------------------------------------------------------------------- accumulation


@pytest.mark.parametrize("arch,accum_steps", [("resnet20_sn", 2), ("resnet20_sn", 4), ("resnet20_bn", 2)])
def test_accumulation_equals_the_full_batch_in_one_step(eager, tmp_path, arch, accum_steps):
    """4 emulated devices of 2 images: 2 micro-batches of 2 devices (ghost batches of 2 inside each), or 4 of one
    device each; the losses, weights and running statistics are the full batch's to float32 rounding."""
    full = eager if arch == "resnet20_sn" else run_in_process(tmp_path / "full", arch=arch)
    accumulated = run_in_process(tmp_path / "accum", "--accum-steps", str(accum_steps), arch=arch)
    assert_trained(accumulated)
    assert_same_losses(accumulated.losses, full.losses, **FLOAT32_TOL)
    assert_same_weights(accumulated.weights, full.weights, **FLOAT32_TOL)
    plan = json.loads((tmp_path / "accum" / "summary.json").read_text())["plan"]
    assert f"gradient accumulation over {accum_steps} micro-batches" in plan


# Runs `python -m snzoo.train` with DDP counting its gradient all-reduces (through a comm hook that does the
# default all-reduce) and every step logged; each rank writes its counts to SYNC_COUNTS_DIR at exit.
DDP_LAUNCHER = textwrap.dedent('''
    import dataclasses, json, os
    from pathlib import Path
    import torch
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from snzoo.train import engine, launch
    from snzoo_cli.main import run_command
    from snzoo_cli.train_commands import train_command

    counts = {"synced_backward_passes": 0, "reduced_buckets": 0}

    def counting_allreduce(state, bucket):
        counts["reduced_buckets"] += 1
        counts["synced_backward_passes"] += int(bucket.is_last())
        return allreduce_hook(state, bucket)

    class CountingDDP(torch.nn.parallel.DistributedDataParallel):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.register_comm_hook(None, counting_allreduce)

    torch.nn.parallel.DistributedDataParallel = CountingDDP
    launch.train = lambda cfg: engine.train(dataclasses.replace(cfg, log_every=1))
    try:
        run_command(train_command, prog_name="snzoo.train")
    finally:
        path = Path(os.environ["SYNC_COUNTS_DIR"]) / ("rank%s.json" % os.environ["RANK"])
        path.write_text(json.dumps(counts))
''')


def torchrun_counting_syncs(tmp_path: Path, run_dir: Path, *flags: str) -> dict[int, dict]:
    """A 2-process gloo run of the equivalence recipe; returns each rank's DDP all-reduce counts."""
    from test_train import _free_port

    launcher = tmp_path / "ddp_launcher.py"
    launcher.write_text(DDP_LAUNCHER)
    counts_dir = run_dir.with_name(run_dir.name + "-syncs")
    counts_dir.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "SYNC_COUNTS_DIR": str(counts_dir)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), str(launcher),
               *run_args("resnet20_sn", recipe_path(tmp_path), run_dir, *flags)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {rank: json.loads((counts_dir / f"rank{rank}.json").read_text()) for rank in (0, 1)}


def test_ddp_accumulation_syncs_once_per_step_and_equals_the_full_batch(eager, tmp_path):
    """2 gloo processes emulating 2 devices each; --accum-steps 2 runs one device per micro-batch under no_sync
    and all-reduces at the last one: the same per-rank losses as the 2-process run without accumulation, and
    the weights of the one-process full-batch run."""
    whole = torchrun_counting_syncs(tmp_path, tmp_path / "ddp")
    accumulated = torchrun_counting_syncs(tmp_path, tmp_path / "ddp-accum", "--accum-steps", "2")
    for rank in (0, 1):
        assert whole[rank]["synced_backward_passes"] == STEPS
        assert accumulated[rank] == whole[rank]  # one all-reduce of every bucket per step, not per micro-batch
    # Rank 0 logs the loss of its own half of each global batch, in both runs.
    assert_same_losses(train_losses(tmp_path / "ddp-accum"), train_losses(tmp_path / "ddp"), **FLOAT32_TOL)
    assert_same_weights(weights(tmp_path / "ddp-accum"), eager.weights, **FLOAT32_TOL)
    assert_same_weights(weights(tmp_path / "ddp"), eager.weights, **FLOAT32_TOL)
