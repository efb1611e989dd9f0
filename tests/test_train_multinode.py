"""Past one machine: torchrun's c10d rendezvous joins launchers on different nodes into one run.

Here two launchers of one process each stand for two nodes (both on 127.0.0.1; the rendezvous assigns their
node ranks), and their run must equal one launcher of two processes: the same ranks, the same data shards, the
same gloo all-reduces of two summands, so the same weights to the bit. `snzoo finetune` runs under the same
launcher prefix as `python -m snzoo finetune`.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import torch

import snzoo
from test_train import _free_port, recipe_file, snzoo_train, weights

LAUNCH_DEADLINE_S = 150  # a rendezvous that never completes fails the test here, not CI's job timeout
TRAIN = ["--data", "fashion-mnist", "--subset", "64", "--val-subset", "32", "--max-steps", "3", "--epochs", "1",
         "-j", "0", "--deterministic", "--seed", "3"]
PRETRAINED = "resnet20_sn.fmnist_1x32_cos2"  # shipped with the package: nothing to download


def two_node_launch() -> list[str]:
    """torchrun's options for one of two nodes that meet at a fresh c10d rendezvous on 127.0.0.1."""
    return ["--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}",
            "--rdzv-id", f"multinode-{uuid.uuid4().hex[:8]}", "--local-addr", "127.0.0.1"]


def finish(procs: list[subprocess.Popen], what: str) -> list[str]:
    """Wait for the launchers together; when they are not all done by the deadline, stop every one (torchrun
    stops its ranks on SIGTERM) and fail. Returns their stderr after checking that each exited with 0."""
    errors, deadline = [], time.monotonic() + LAUNCH_DEADLINE_S
    try:
        for proc in procs:
            errors.append(proc.communicate(timeout=max(deadline - time.monotonic(), 1))[1])
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.terminate()
        tails = [proc.communicate(timeout=60)[1][-1500:] for proc in procs]
        pytest.fail(f"{what}: not done within {LAUNCH_DEADLINE_S} s (a rendezvous that never completed?)\n"
                    + "\n---\n".join(tails))
    for proc, err in zip(procs, errors):
        assert proc.returncode == 0, f"{what}:\n{err[-3000:]}"
    return errors


def launch_two_nodes(args: list, module: str = "snzoo.train") -> list[str]:
    """The same command on both 'nodes', started at once, as a user starts it on each machine."""
    launch = two_node_launch()
    return finish([snzoo_train(args, nproc=1, launch=launch, module=module) for _ in range(2)], "two nodes")


def processes_of(run_dir: Path) -> str:
    """The batch plan the run recorded in RUN_DIR/recipe.json, which names its number of processes."""
    return json.loads((run_dir / "recipe.json").read_text())["run"]["plan"]


@pytest.mark.timeout(2 * LAUNCH_DEADLINE_S + 60)
def test_two_nodes_of_one_process_equal_one_node_of_two(tmp_path):
    recipe = recipe_file(tmp_path, epochs=1)  # 4 devices x 2: each process emulates two with ghost batches
    args = ["resnet20_sn", "--recipe", recipe, *TRAIN]
    launch_two_nodes([*args, "-o", tmp_path / "nodes"])
    finish([snzoo_train([*args, "-o", tmp_path / "one"], nproc=2, launch=["--standalone"])], "one node")

    for run in ("nodes", "one"):
        assert "on 2 process(es)" in processes_of(tmp_path / run), run
        assert json.loads((tmp_path / run / "summary.json").read_text())["steps"] == 3
    nodes, one = weights(tmp_path / "nodes"), weights(tmp_path / "one")
    assert nodes.keys() == one.keys()
    different = [key for key in one if not torch.equal(nodes[key], one[key])]
    assert not different, different


@pytest.mark.timeout(LAUNCH_DEADLINE_S + 60)
def test_finetune_runs_on_two_nodes_with_the_same_launcher_prefix(tmp_path):
    run_dir = tmp_path / "ft"
    launch_two_nodes(["finetune", PRETRAINED, "--data", "fashion-mnist", "--batch", "2x4", "--lr", "0.05",
                      "--freeze", "conv1", "-o", run_dir, *TRAIN], module="snzoo")
    assert "on 2 process(es)" in processes_of(run_dir)
    tuned, pretrained = weights(run_dir), snzoo.create_model(PRETRAINED, pretrained=True).state_dict()
    assert torch.equal(tuned["conv1.weight"], pretrained["conv1.weight"])  # frozen, from the entry on both ranks
    assert not torch.equal(tuned["layer3.2.conv2.weight"], pretrained["layer3.2.conv2.weight"])  # trained
