"""The training loop's fast paths compute and report what the per-step paths did.

Losses stay on the device between the steps the loop logs, checkpoints or stops at, and are then read in one
transfer: the log holds each logged step's own loss, a non-finite loss is still reported at its own step with
the last good checkpoint kept, on one process and under torchrun. Each sample's augmentation is seeded from
(seed, epoch, index) with an epoch's seeds computed together and without torch.manual_seed's cost: the same
seeds and images as SeededAugmentation, in the main process and in DataLoader workers.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import random
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from snzoo.data.augment import SeededAugmentation, _sample_seed
from snzoo.train import TrainConfig, TrainingError, train
from snzoo.train.data import build_train_data
from snzoo.data._seed_sequence import sample_seeds
from snzoo.train.run_log import read_metrics

from test_train import COMMON, RECIPE, recipe_file, snzoo_train, weights

pytestmark = pytest.mark.usefixtures("one_thread")

SUBSET = 96  # 4 devices x 2 images: 12 steps per epoch
# The learning rate jumps by 1e12 at epoch 1, so the run diverges a few steps into it, after epoch 0's
# checkpoint (step 12): its first non-finite loss is at epoch 1, step 2 (the 15th step), between the steps a
# run with log_every 10 and checkpoint_every 4 reads its losses at (10, 12, and 16, which it must not reach).
DIVERGING = {**copy.deepcopy(RECIPE),
             "schedule": {"type": "step", "milestones": [1], "gamma": 1e12, "warmup_epochs": 0}}
DIVERGED_AT = "non-finite loss (nan) at epoch 1, step 2 (lr 1.25e+10); stopped, the last good checkpoint is"


def _train(run_dir: Path, recipe: dict, **options) -> dict:
    cfg = dict(name="resnet20_bn", recipe=recipe, data="fashion-mnist", output=run_dir, workers=0, seed=5,
               subset=SUBSET, val_subset=16, progress=False)
    with contextlib.redirect_stderr(io.StringIO()):
        return train(TrainConfig(**{**cfg, **options}))


def _train_lines(run_dir: Path) -> dict:
    return {r["step"]: (r["epoch"], r["loss"], r["lr"]) for r in read_metrics(run_dir) if r["split"] == "train"}


def test_logged_losses_are_the_losses_of_their_steps(tmp_path):
    """Read every 5 steps (and at checkpoints every 3), the log holds what a run reading every step logs there."""
    recipe = {**copy.deepcopy(RECIPE), "epochs": 1}
    _train(tmp_path / "every", recipe, log_every=1)
    _train(tmp_path / "held", recipe, log_every=5, checkpoint_every=3)
    every, held = _train_lines(tmp_path / "every"), _train_lines(tmp_path / "held")
    assert sorted(every) == list(range(1, 13)) and sorted(held) == [5, 10, 12]  # 12: the epoch's last step
    assert len({loss for _, loss, _ in every.values()}) == 12  # a stale or neighbouring step's loss would show
    assert held == {step: every[step] for step in held}
    a, b = weights(tmp_path / "every"), weights(tmp_path / "held")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_non_finite_loss_between_reads_is_reported_at_its_own_step(tmp_path):
    """The loss read where it is logged or checkpointed still stops the run at the step that diverged, with the
    checkpoint before it kept and no checkpoint or log line written after it, as reading every step does."""
    errors = {}
    for name, log_every in (("every", 1), ("held", 10)):
        with pytest.raises(TrainingError) as caught:
            _train(tmp_path / name, DIVERGING, log_every=log_every, checkpoint_every=4)
        errors[name] = str(caught.value).replace(str(tmp_path / name), "RUN")
        state = torch.load(tmp_path / name / "state.pt", weights_only=True)
        assert state["step"] == 12
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert errors["held"] == errors["every"]
    assert errors["held"].startswith(DIVERGED_AT) and "(step 12)" in errors["held"]
    assert max(_train_lines(tmp_path / "held")) == 12


def test_under_torchrun_every_rank_stops_at_the_step_that_diverged(tmp_path):
    """The ranks read their losses at the same steps and agree on the first non-finite one (one all-reduce)."""
    recipe = recipe_file(tmp_path, schedule=DIVERGING["schedule"])
    proc = snzoo_train(["resnet20_bn", "--recipe", recipe, "-o", tmp_path / "ddp", "--checkpoint-every", "4",
                        *COMMON], nproc=2)
    try:
        _, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        proc.terminate()  # torchrun stops its ranks (each in a session of its own) on SIGTERM
        proc.communicate(timeout=60)
        pytest.fail("the ranks did not finish within 180 s: they waited on each other (a read on one rank only?)")
    assert proc.returncode != 0
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 2, err[-3000:]  # one per rank
    assert all(line.startswith(f"error: {DIVERGED_AT}") and "(step 12)" in line for line in lines), lines
    assert torch.load(tmp_path / "ddp" / "state.pt", weights_only=True)["step"] == 12


@pytest.mark.parametrize("seed, epoch", [(0, 0), (5, 1), (3, 119), (2**32 - 1, 7), (2**32, 0), (2**40 + 9, 2**33 + 1),
                                         (2**64 - 1, 2)])
def test_an_epochs_seeds_are_the_seedsequence_seeds_of_its_samples(seed, epoch):
    """Computed for all indices at once, seeds of one or several 32-bit words alike."""
    seeds = sample_seeds(seed, epoch, 1500)
    assert seeds.shape == (1500,) and len(set(seeds.tolist())) == 1500
    assert [int(s) for s in seeds] == [_sample_seed(seed, epoch, i) for i in range(1500)]


def _seeded_reference(dataset, transform, seed, epoch, index):
    """A sample as seeding every generator with torch.manual_seed inside fork_rng gives it."""
    image, label = dataset[index][:2]
    words = np.random.SeedSequence([seed, epoch, index]).generate_state(2, dtype=np.uint32)
    python_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(words[0]) << 32 | int(words[1]))
        random.seed(int(words[0]) << 32 | int(words[1]))
        try:
            return transform(image), label, index
        finally:
            random.setstate(python_state)


def test_sample_seeding_gives_the_images_of_full_seeding_and_leaves_the_global_rngs():
    data = build_train_data("fashion-mnist", RECIPE, seed=3, subset=200, in_chans=1)
    assert isinstance(data.train, SeededAugmentation)
    torch.manual_seed(11)
    random.seed(11)
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    for epoch in (0, 4):
        data.train.set_epoch(epoch)
        for index in range(0, 200, 7):
            image, label, i = data.train[index]
            expected = _seeded_reference(data.train.dataset, data.train_transform, 3, epoch, index)
            assert torch.equal(image, expected[0]) and (label, i) == expected[1:], (epoch, index)
    assert not torch.equal(data.train[5][0], _seeded_reference(data.train.dataset, data.train_transform, 3, 4, 6)[0])
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == python_state


def test_dataloader_workers_train_the_weights_of_the_main_process(tmp_path):
    """Augmentation in worker processes draws the streams it draws in the main process (-j 2 equals -j 0)."""
    recipe = {**copy.deepcopy(RECIPE), "epochs": 1}
    _train(tmp_path / "main", recipe, workers=0, max_steps=6)
    _train(tmp_path / "workers", recipe, workers=2, max_steps=6)
    a, b = weights(tmp_path / "main"), weights(tmp_path / "workers")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "workers" / "summary.json").read_text())["steps"] == 6


def test_log_every_sets_where_the_command_reads_and_logs_the_loss(tmp_path):
    from click.testing import CliRunner

    from snzoo_cli.main import cli
    from test_train import recipe_file

    recipe = recipe_file(tmp_path, epochs=1)
    result = CliRunner().invoke(cli, ["train", "resnet20_bn", "--recipe", str(recipe), "-o", str(tmp_path / "run"),
                                      "--data", "fashion-mnist", "--subset", "96", "--val-subset", "16", "-j", "0",
                                      "--log-every", "4"])
    assert result.exit_code == 0, result.output
    assert sorted(_train_lines(tmp_path / "run")) == [4, 8, 12]  # 12: the epoch's last step
    bad = CliRunner().invoke(cli, ["train", "resnet20_bn", "--recipe", str(recipe), "-o", str(tmp_path / "bad"),
                                   "--data", "fashion-mnist", "--log-every", "0"])
    assert bad.exit_code == 2 and "--log-every" in bad.output and "Traceback" not in bad.output
    assert not (tmp_path / "bad").exists()
