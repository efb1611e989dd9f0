"""Training: schedules, parameter groups, batch plans, DDP equivalences on Fashion-MNIST, resume, fine-tuning."""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import snzoo
from snzoo import zoo
from snzoo.weights import read_state_dict
from snzoo.train import TrainingError, plan_batches
from snzoo.train.optim import build_optimizer, parameter_groups
from snzoo.train.recipe import RecipeError, peak_learning_rate, resolve_recipe
from snzoo.train.sampler import GlobalBatchSampler
from snzoo.train.schedule import learning_rate, sparsestmax_radius
from snzoo_cli.main import cli

RECIPE = {
    "epochs": 2, "batch": {"devices": 4, "per_device": 2},
    "optimizer": {"name": "sgd", "momentum": 0.9, "nesterov": False, "weight_decay": 1e-4, "weight_decay_norm": True},
    "lr": {"base": 0.1, "reference_batch": 64},
    "schedule": {"type": "cosine", "warmup_epochs": 0},
    "augmentation": {"crop": 28, "random_resized_crop": False, "pad_crop": 2, "hflip": True, "lighting": None,
                     "color_jitter": None, "final_phase": None},
    "dropout": 0.0, "label_smoothing": 0.0, "statistics": "per_device", "average_running_stats_before_eval": False,
    "batch_average": None, "sparsestmax": None,
}


def recipe_file(tmp_path: Path, **changes) -> Path:
    recipe = copy.deepcopy(RECIPE)
    for key, value in changes.items():
        recipe[key] = value
    path = tmp_path / f"recipe-{len(list(tmp_path.glob('recipe-*')))}.json"
    path.write_text(json.dumps(recipe))
    return path


# ---------------------------------------------------------------------------------------------- schedules


def test_cosine_schedule_with_warmup_follows_the_formula():
    schedule, peak, iters, epochs = {"type": "cosine", "warmup_epochs": 5}, 0.1, 100, 120
    assert learning_rate(schedule, peak, 0, 0, iters, epochs) == 0.0
    assert learning_rate(schedule, peak, 2, 50, iters, epochs) == pytest.approx(peak * 250 / 500)
    assert learning_rate(schedule, peak, 5, 0, iters, epochs) == pytest.approx(peak)
    mid = 500 + (12000 - 500) // 2
    assert learning_rate(schedule, peak, mid // iters, mid % iters, iters, epochs) == pytest.approx(peak / 2, rel=1e-3)
    t = 9000
    expected = 0.5 * peak * (1 + math.cos(math.pi * (t - 500) / (12000 - 500)))
    assert learning_rate(schedule, peak, t // iters, t % iters, iters, epochs) == pytest.approx(expected)
    assert learning_rate(schedule, peak, 119, 99, iters, epochs) < 1e-6


def test_step_schedule_and_the_published_learning_rates():
    schedule = {"type": "step", "milestones": [30, 60, 90], "gamma": 0.1}
    values = [learning_rate(schedule, 0.1, e, 7, 50, 100) for e in (0, 29, 30, 59, 60, 90, 99)]
    assert values == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.0001, 0.0001])
    assert peak_learning_rate(zoo.get_entry("resnet50v1_sn.in1k_8x4_step100").recipe) == pytest.approx(0.0125)
    assert peak_learning_rate(zoo.get_entry("resnet50v1_sn.in1k_8x1_step100").recipe) == pytest.approx(0.003125)
    assert peak_learning_rate(zoo.get_entry("resnet50v1_sn.in1k_8x32_cos120").recipe) == pytest.approx(0.1)


def test_sparsestmax_radius_rises_linearly_from_0_to_1():
    assert sparsestmax_radius(0, 0, 10, 100) == 0.0
    assert sparsestmax_radius(50, 0, 10, 100) == 0.5
    assert sparsestmax_radius(99, 9, 10, 100) == pytest.approx(999 / 1000)


def test_recipe_overrides_and_errors(tmp_path):
    recipe = resolve_recipe(RECIPE, None, ["schedule.type=step", "schedule.milestones=[1]", "batch.per_device=4"])
    assert recipe["schedule"]["type"] == "step" and recipe["batch"]["per_device"] == 4
    override = tmp_path / "o.json"
    override.write_text(json.dumps({"epochs": 7, "optimizer": {"weight_decay": 0.0}}))
    recipe = resolve_recipe(RECIPE, override)
    assert recipe["epochs"] == 7 and recipe["optimizer"]["weight_decay"] == 0.0 and recipe["optimizer"]["momentum"] == 0.9
    with pytest.raises(RecipeError, match="schedule.type must be"):
        resolve_recipe(RECIPE, None, ["schedule.type=linear"])
    with pytest.raises(RecipeError, match="KEY=VALUE"):
        resolve_recipe(RECIPE, None, ["epochs"])


# ---------------------------------------------------------------------------------------------- groups, plans, sampler


def test_parameter_groups_follow_the_recipes():
    sn = snzoo.create_model("resnet18v1_sn")
    groups = {g["name"]: g for g in parameter_groups(sn, zoo.get_entry("resnet50v1_sn").recipe)}
    assert all(g["weight_decay"] == 1e-4 for g in groups.values())  # SN recipes decay everything
    assert len(groups["importance"]["params"]) == 2 * 20
    ssn = snzoo.create_model("resnet50v1_ssn")
    groups = {g["name"]: g for g in parameter_groups(ssn, zoo.get_entry("resnet50v1_ssn").recipe)}
    assert groups["sparse_importance"]["lr_scale"] == pytest.approx(0.1)
    assert groups["sparse_importance"]["weight_decay"] == 0.0 and len(groups["sparse_importance"]["params"]) == 2 * 53
    no_decay = dict(RECIPE, optimizer=dict(RECIPE["optimizer"], weight_decay_norm=False))
    groups = {g["name"]: g for g in parameter_groups(sn, no_decay)}
    assert groups["norm"]["weight_decay"] == 0.0 and groups["importance"]["weight_decay"] == 0.0
    assert groups["default"]["weight_decay"] == 1e-4
    total = sum(p.numel() for g in build_optimizer(sn, no_decay).param_groups for p in g["params"])
    assert total == sum(p.numel() for p in sn.parameters())


def test_batch_plans_emulate_devices():
    recipe = dict(RECIPE, batch={"devices": 8, "per_device": 2})
    one = plan_batches(recipe, 1)
    assert (one.process_batch, one.ghost, one.global_batch) == (16, 2, 16) and "ghost batches of 2" in one.description
    two = plan_batches(recipe, 2, accum_steps=2)
    assert (two.process_batch, two.micro_batch, two.ghost) == (8, 4, 2)
    eight = plan_batches(recipe, 8)
    assert eight.ghost is None and eight.process_batch == 2
    with pytest.raises(TrainingError, match="do not split over 3"):
        plan_batches(recipe, 3)
    with pytest.raises(TrainingError, match="accum-steps 3"):
        plan_batches(recipe, 1, accum_steps=3)
    with pytest.raises(TrainingError, match="one process per recipe device"):
        plan_batches(recipe, 2, sync_stats=True)


def test_sampler_slices_one_global_batch_over_ranks_and_resumes():
    ranks = [GlobalBatchSampler(100, 8, rank=r, world_size=2, seed=3) for r in range(2)]
    single = GlobalBatchSampler(100, 8, seed=3)
    for sampler in ranks + [single]:
        sampler.set_epoch(1)
    for (a, b), whole in zip(zip(*ranks), single):
        assert a + b == whole
    assert len(single) == 12
    single.set_epoch(1, start=5)
    resumed = list(single)
    single.set_epoch(1)
    assert resumed == list(single)[5:]
    single.set_epoch(2)
    assert list(single) != list(GlobalBatchSampler(100, 8, seed=3))


# ---------------------------------------------------------------------------------------------- real runs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def snzoo_train(args: list, nproc: int = 1, env_extra: dict | None = None, launch: list | None = None,
                module: str = "snzoo.train", **popen):
    """`python -m MODULE ARGS` (one gloo thread per process), under torchrun for nproc > 1 or when `launch` gives
    torchrun's own options (default: one node, a free port on 127.0.0.1)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", **(env_extra or {})}
    if nproc == 1 and launch is None:
        command = [sys.executable, "-m", module]
    else:
        launch = ["--master_addr", "127.0.0.1", "--master_port", str(_free_port())] if launch is None else launch
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), *launch,
                   "-m", module]
    return subprocess.Popen(command + [str(a) for a in args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def run_ok(args: list, nproc: int = 1, timeout: float = 300) -> str:
    proc = snzoo_train(args, nproc)
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return out


def weights(run_dir: Path) -> dict:
    (path,) = run_dir.glob("*.safetensors")
    return read_state_dict(path)


def assert_close_state(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=atol, rtol=1e-4), key


COMMON = ["--data", "fashion-mnist", "--subset", "96", "--val-subset", "64", "-j", "0", "--seed", "5"]


def test_two_process_ddp_equals_ghost_batch_emulation(tmp_path):
    recipe = recipe_file(tmp_path, epochs=1)
    run_ok(["resnet20_sn", "--recipe", recipe, "-o", tmp_path / "ddp", *COMMON], nproc=2)
    run_ok(["resnet20_sn", "--recipe", recipe, "-o", tmp_path / "ghost", *COMMON])
    ddp, ghost = weights(tmp_path / "ddp"), weights(tmp_path / "ghost")
    assert_close_state(ddp, ghost)
    assert not torch.equal(ddp["fc.weight"], snzoo.create_model("resnet20_sn", num_classes=10).fc.weight)
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["steps"] == 96 // 8 and "2 process(es)" in summary["plan"]


def test_sync_stats_equals_single_process_full_batch_statistics(tmp_path):
    synced = recipe_file(tmp_path, epochs=1, batch={"devices": 2, "per_device": 4})
    full = recipe_file(tmp_path, epochs=1, batch={"devices": 1, "per_device": 8})
    run_ok(["resnet20_sn", "--recipe", synced, "--sync-stats", "-o", tmp_path / "sync", *COMMON], nproc=2)
    run_ok(["resnet20_sn", "--recipe", full, "-o", tmp_path / "full", *COMMON])
    assert_close_state(weights(tmp_path / "sync"), weights(tmp_path / "full"))


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    recipe = recipe_file(tmp_path, epochs=2, dropout=0.2)
    args = ["resnet20_sn", "--recipe", recipe, "--deterministic", "--checkpoint-every", "2", *COMMON]
    run_ok(args + ["-o", tmp_path / "straight"])
    victim = snzoo_train(args + ["-o", tmp_path / "killed"])
    state = tmp_path / "killed" / "state.pt"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if state.exists() and torch.load(state, weights_only=True)["step"] >= 16:
            break
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    saved = torch.load(state, weights_only=True)
    assert 16 <= saved["step"] < 24  # killed in the second epoch, before the end
    assert not list((tmp_path / "killed").glob("*.safetensors"))
    run_ok(args + ["-o", tmp_path / "killed", "--resume"])
    straight, resumed = weights(tmp_path / "straight"), weights(tmp_path / "killed")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    steps = [r["step"] for r in map(json.loads, (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines())
             if r["split"] == "train"]
    assert steps == sorted(set(steps))  # the resumed run did not log a step twice


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    recipe = recipe_file(tmp_path, epochs=1)
    proc = snzoo_train(["resnet20_bn", "--recipe", recipe, "--lr", "1e12", "--checkpoint-every", "1",
                        "-o", tmp_path / "nan", *COMMON])
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1
    assert err.strip().splitlines()[-1].startswith("error: non-finite")
    state = torch.load(tmp_path / "nan" / "state.pt", weights_only=True)
    assert f"(step {state['step']})" in err
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_end_of_run_exports_weights_and_a_manifest_ready_entry(tmp_path):
    recipe = recipe_file(tmp_path, epochs=1)
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", "resnet32_gn", "--recipe", str(recipe), "-o", str(run_dir), "--json",
                                      *COMMON])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    entry_file = Path(summary["entry"])
    manifest = json.loads(entry_file.read_text())
    (name, entry), = manifest["entries"].items()
    assert name == "resnet32_gn.fmnist_4x2_cos1" and entry["recipe"]["epochs"] == 1
    assert entry["sources"][0]["sha256"] == summary["sha256"]
    assert entry["metrics"]["fashion-mnist-test"]["top1"] == pytest.approx(summary["val"]["top1"], abs=0.01)
    zoo.set_overlay(entry_file)
    model = snzoo.create_model(name, pretrained=True)  # the new entry fetches, verifies and loads
    assert torch.equal(model.fc.weight, weights(run_dir)["fc.weight"])
    assert (run_dir / "recipe.json").exists() and (run_dir / "tensorboard").is_dir()
    plots = CliRunner().invoke(cli, ["plot", str(run_dir), "--json"])
    assert plots.exit_code == 0, plots.output


def test_finetune_replaces_the_head_and_improves_accuracy(tmp_path):
    # A small "pretrained" entry: resnet20_sn trained briefly on all of Fashion-MNIST's classes.
    recipe = recipe_file(tmp_path, epochs=1)
    base = tmp_path / "base"
    run_ok(["resnet20_sn", "--recipe", recipe, "-o", base, "--data", "fashion-mnist", "--subset", "480",
            "--val-subset", "64", "-j", "0"])
    zoo.set_overlay(base / "entry.json")
    (name,) = json.loads((base / "entry.json").read_text())["entries"]
    # A new 3-class task from real images: trouser / bag / sneaker as class folders.
    from snzoo.data.fashion_mnist import FashionMNIST

    folder = tmp_path / "three"
    pick = {1: "trouser", 8: "bag", 7: "sneaker"}
    counts = {"train": {}, "val": {}}
    for split, source, limit in (("train", FashionMNIST("train"), 64), ("val", FashionMNIST("test"), 30)):
        for image, label, index in source:
            if label in pick and counts[split].get(label, 0) < limit:
                target = folder / split / pick[label]
                target.mkdir(parents=True, exist_ok=True)
                image.save(target / f"{index}.png")
                counts[split][label] = counts[split].get(label, 0) + 1
            if len(counts[split]) == 3 and min(counts[split].values()) == limit:
                break
    env = {"SNZOO_MANIFEST": str(base / "entry.json")}
    out = subprocess.run([sys.executable, "-m", "snzoo", "finetune", name, "--data", str(folder), "-o",
                          str(tmp_path / "ft"), "--epochs", "3", "--batch", "1x16", "--lr", "0.05", "-j", "0",
                          "--freeze", "conv1", "--json"],
                         env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout)
    tuned = weights(tmp_path / "ft")
    assert tuned["fc.weight"].shape == (3, 64)
    assert torch.equal(tuned["conv1.weight"], weights(base)["conv1.weight"])  # frozen
    assert summary["val"]["top1"] > 50.0  # chance is 33.3


def test_training_from_list_files(tmp_path):
    from snzoo.data.fashion_mnist import FashionMNIST

    lines = {"train": [], "val": []}
    for split, source, count in (("train", FashionMNIST("train"), 48), ("val", FashionMNIST("test"), 16)):
        (tmp_path / "images" / split).mkdir(parents=True)
        for index in range(count):
            image, label, _ = source[index]
            image.convert("RGB").save(tmp_path / "images" / split / f"{index}.png")
            lines[split].append(f"images/{split}/{index}.png {label}")
        (tmp_path / f"{split}.txt").write_text("\n".join(lines[split]) + "\n")
    recipe = recipe_file(tmp_path, epochs=1, batch={"devices": 2, "per_device": 4})
    run_ok(["resnet20_bn", "--recipe", recipe, "-o", tmp_path / "run", "--data", tmp_path, "-j", "0",
            "--set", "model_note=list-files"])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["val"]["n"] == 16


def test_the_last_line_says_what_was_done(tmp_path):
    """A run cut by --max-steps says how far it got and that no epoch ended; a finished run gives its metrics."""
    recipe = recipe_file(tmp_path, epochs=1)
    short = CliRunner().invoke(cli, ["train", "resnet20_sn", "--recipe", str(recipe), "-o", str(tmp_path / "short"),
                                     *COMMON, "--max-steps", "2"])
    assert short.exit_code == 0, short.output
    last = [line for line in short.output.splitlines() if line.startswith("[snzoo train] done:")]
    assert len(last) == 1 and last[0].startswith(
        "[snzoo train] done: 2 steps, 0 epochs (stopped at --max-steps); no validation (no epoch ended) -> "
    ), short.output[-2000:]
    assert last[0].endswith(".safetensors")
    full = CliRunner().invoke(cli, ["train", "resnet20_sn", "--recipe", str(recipe), "-o", str(tmp_path / "full"),
                                    *COMMON])
    assert full.exit_code == 0, full.output
    (done,) = [line for line in full.output.splitlines() if line.startswith("[snzoo train] done:")]
    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert done.startswith(f"[snzoo train] done: {summary['steps']} steps, 1 epochs; ") and "top1" in done, done
    assert done.endswith(f"-> {summary['weights']}")


def test_fewer_samples_than_one_batch_is_one_error_line_that_names_the_fix():
    with pytest.raises(TrainingError, match=r"30 training samples are fewer than one step's batch of 32; lower --batch"):
        GlobalBatchSampler(30, 32)
    assert len(GlobalBatchSampler(32, 32)) == 1
