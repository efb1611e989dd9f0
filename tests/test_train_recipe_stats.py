"""The recipe's `statistics` and `average_running_stats_before_eval` in real two-process gloo training runs.

One spawn of two processes runs every scenario through `train()` (starting processes is the slow part). Each rank
records its own running statistics after every optimiser step, and rank 0 those its validation sees, by wrapping
the engine's `build_optimizer` and the validation's `evaluate`: the real functions run, the wrappers only copy the buffers.
"""

from __future__ import annotations

import copy
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from snzoo.train.engine import TrainConfig, synchronised_statistics, train

from spawn_testing import spawn_and_wait

from test_train import COMMON, RECIPE, assert_close_state, recipe_file, run_ok, snzoo_train, weights

WORLD = 2
SUBSET, VAL_SUBSET, SEED = 32, 16, 5
STEPS_PER_EPOCH = SUBSET // 8  # every scenario's global batch is 8 images
SPAWN_TIMEOUT_S = 240

pytestmark = [
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"),
    pytest.mark.timeout(SPAWN_TIMEOUT_S + 120),
]


def scenario_recipe(**changes) -> dict:
    recipe = copy.deepcopy(RECIPE)
    recipe.update(changes)
    return recipe


# name -> (recipe, run directory, extra TrainConfig fields); run in this order by both ranks.
OWN = scenario_recipe(epochs=2, statistics="per_device", average_running_stats_before_eval=False)
AVERAGED = scenario_recipe(epochs=2, statistics="per_device", average_running_stats_before_eval=True)
SYNCED = scenario_recipe(epochs=1, batch={"devices": 2, "per_device": 4}, statistics="synchronized")
INTERRUPT_AT = STEPS_PER_EPOCH + 2  # inside the second epoch, after a validation with per-rank statistics
SCENARIOS = {
    "own": (OWN, "own", {}),
    "own_interrupted": (OWN, "own_resumed", {"max_steps": INTERRUPT_AT}),
    "own_resumed": (OWN, "own_resumed", {"resume": True}),
    "averaged": (AVERAGED, "averaged", {}),
    "synced": (SYNCED, "synced", {}),
}


def running_stats(model: torch.nn.Module) -> dict:
    return {name: buffer.detach().clone() for name, buffer in model.named_buffers()
            if name.endswith(("running_mean", "running_var"))}


def _worker(rank: int, ports: list, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1")
    if os.path.isdir("/sys/class/net/lo"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    from snzoo.train import _tasks, engine

    record: dict = {}
    build, evaluate = engine.build_optimizer, _tasks.evaluate

    def build_and_observe(model, recipe):
        optimizer = build(model, recipe)
        optimizer.register_step_post_hook(lambda *_: record["steps"].append(running_stats(model)))
        return optimizer

    def evaluate_and_observe(model, *args, **kwargs):
        record["val"].append(running_stats(model))
        return evaluate(model, *args, **kwargs)

    # Validation goes through the classification task's adapter, which calls snzoo.eval's `evaluate`.
    engine.build_optimizer, _tasks.evaluate = build_and_observe, evaluate_and_observe
    for (name, (recipe, run_dir, extra)), port in zip(SCENARIOS.items(), ports):
        os.environ["MASTER_PORT"] = str(port)
        record.update(steps=[], val=[])
        summary = engine.train(TrainConfig(name="resnet20_sn", recipe=recipe, data="fashion-mnist",
                                           output=Path(out_dir) / run_dir, workers=0, seed=SEED, subset=SUBSET,
                                           val_subset=VAL_SUBSET, deterministic=True, progress=False, **extra))
        torch.save(dict(record, summary=summary), Path(out_dir) / f"{name}.rank{rank}.pt")


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """name -> {"dir": run directory, "ranks": [rank 0's record, rank 1's record]}."""
    tmp = tmp_path_factory.mktemp("recipe_stats")
    spawn_and_wait(_worker, (_free_ports(len(SCENARIOS)), str(tmp)), WORLD, SPAWN_TIMEOUT_S, "gloo training")
    return {name: {"dir": tmp / run_dir,
                   "ranks": [torch.load(tmp / f"{name}.rank{r}.pt", weights_only=False) for r in range(WORLD)]}
            for name, (_, run_dir, _) in SCENARIOS.items()}


def mean_of(a: dict, b: dict) -> dict:
    return {k: (a[k] + b[k]) / 2 for k in a}


def assert_stats_equal(actual: dict, expected: dict, what: str) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        assert torch.allclose(actual[key], expected[key], rtol=1e-6, atol=1e-7), f"{what}: {key}"


def stats_differ(a: dict, b: dict) -> bool:
    return any(not torch.allclose(a[k], b[k], rtol=1e-6, atol=1e-7) for k in a)


def epoch_end(record: dict, epoch: int) -> dict:
    """A rank's running statistics after the last step of `epoch`, before anything at the epoch's end."""
    return record["steps"][(epoch + 1) * STEPS_PER_EPOCH - 1]


def exported_stats(run_dir: Path) -> dict:
    return {k: v for k, v in weights(run_dir).items() if k.endswith(("running_mean", "running_var"))}


def test_without_averaging_rank_0_validates_with_its_own_statistics(runs):
    rank0, rank1 = runs["own"]["ranks"]
    assert len(rank0["val"]) == 2 and not rank1["val"]  # validation runs on rank 0 only, once per epoch
    for epoch in range(2):
        own, other = epoch_end(rank0, epoch), epoch_end(rank1, epoch)
        assert stats_differ(own, other)  # the ranks saw different images: an average would show
        assert_stats_equal(rank0["val"][epoch], own, f"epoch {epoch} validation")
        assert stats_differ(rank0["val"][epoch], mean_of(own, other))


def test_with_averaging_rank_0_validates_with_the_average_over_ranks(runs):
    rank0, rank1 = runs["averaged"]["ranks"]
    for epoch in range(2):
        own, other = epoch_end(rank0, epoch), epoch_end(rank1, epoch)
        assert stats_differ(own, other)
        assert_stats_equal(rank0["val"][epoch], mean_of(own, other), f"epoch {epoch} validation")


@pytest.mark.parametrize("name", ["own", "averaged"])
def test_exported_statistics_are_the_average_over_ranks(runs, name):
    rank0, rank1 = runs[name]["ranks"]
    last0, last1 = rank0["steps"][-1], rank1["steps"][-1]
    assert stats_differ(last0, last1)
    assert_stats_equal(exported_stats(runs[name]["dir"]), mean_of(last0, last1), f"{name} export")


def test_a_resumed_run_restores_each_ranks_own_statistics(runs):
    """Stopped inside the second epoch (per-rank statistics, not averaged at validation), then resumed: the
    same statistics and weights as the uninterrupted run, which needs rank 1's own statistics in the checkpoint."""
    interrupted = runs["own_interrupted"]["ranks"][0]["summary"]
    assert interrupted["stopped_early"] and interrupted["steps"] == INTERRUPT_AT
    straight, resumed = runs["own"]["ranks"], runs["own_resumed"]["ranks"]
    for rank in range(WORLD):
        assert len(resumed[rank]["steps"]) == 2 * STEPS_PER_EPOCH - INTERRUPT_AT
        assert_stats_equal(resumed[rank]["steps"][-1], straight[rank]["steps"][-1], f"rank {rank} after resume")
    assert_stats_equal(resumed[0]["val"][-1], straight[0]["val"][-1], "validation after resume")
    a, b = weights(runs["own"]["dir"]), weights(runs["own_resumed"]["dir"])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_synchronized_recipe_synchronises_the_statistics(runs, tmp_path):
    """statistics: synchronized, 2 devices x 4 images on 2 processes: the statistics of all 8 images, on both
    ranks, as one process trains on the full batch of 8."""
    rank0, rank1 = runs["synced"]["ranks"]
    assert "statistics synchronised over all 8 images" in rank0["summary"]["plan"]
    for mine, theirs in zip(rank0["steps"], rank1["steps"]):
        assert_stats_equal(mine, theirs, "rank 0 against rank 1")
    full = scenario_recipe(epochs=1, batch={"devices": 1, "per_device": 8})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(TrainConfig(name="resnet20_sn", recipe=full, data="fashion-mnist", output=tmp_path / "full", workers=0,
                          seed=SEED, subset=SUBSET, val_subset=VAL_SUBSET, progress=False))
    finally:
        torch.set_num_threads(threads)
    assert_close_state(weights(runs["synced"]["dir"]), weights(tmp_path / "full"))
    recorded = json.loads((runs["synced"]["dir"] / "recipe.json").read_text())
    assert recorded["run"]["sync_stats"] is True


def test_the_recipe_value_is_the_default_and_the_flag_overrides_it(tmp_path):
    synced, per_device = dict(RECIPE, statistics="synchronized"), dict(RECIPE, statistics="per_device")
    assert synchronised_statistics(synced) and not synchronised_statistics(per_device)
    assert not synchronised_statistics(synced, False) and synchronised_statistics(per_device, True)
    # On one process a synchronised 4x2 recipe cannot run (4 devices, one process); --no-sync-stats trains it
    # per device with ghost batches.
    recipe = recipe_file(tmp_path, statistics="synchronized")
    base = ["resnet20_sn", "--recipe", recipe, "--max-steps", "1", "--json", *COMMON]
    refused = snzoo_train([*base, "-o", tmp_path / "refused"])
    _, err = refused.communicate(timeout=300)
    assert refused.returncode == 1
    assert err.strip().splitlines()[-1] == (
        "error: synchronised statistics (--sync-stats, or the recipe's statistics: synchronized) need one process "
        "per recipe device; launch 4 processes or pass --no-sync-stats")
    assert "Traceback" not in err
    summary = json.loads(run_ok([*base, "--no-sync-stats", "-o", tmp_path / "per_device"]))
    assert "ghost batches of 2" in summary["plan"]
