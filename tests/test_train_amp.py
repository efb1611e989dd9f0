"""`--amp float16` and its GradScaler in real training runs: overflowing steps skipped, the scale restored on resume.

The overflow is real: the runs start from resnet20_sn weights whose classifier is scaled up 100-fold, so the loss
stays finite (the engine would stop on a non-finite one) while its float16 gradients, times the scaler's initial
2**16, overflow until the scale has come down. The runs go through `train()` in this process; the engine's
`save_state` and `load_state` are wrapped to read each checkpoint the run writes or reads (the real ones run).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import snzoo
from snzoo.train import engine
from snzoo.train.engine import TrainConfig, train

from test_train import RECIPE, weights

SUBSET, PER_STEP = 64, 8
STEPS = SUBSET // PER_STEP
INITIAL_SCALE = 2.0 ** 16  # GradScaler's default, which the engine keeps
CLASSIFIER_GAIN = 100.0


@pytest.fixture(autouse=True)
def _one_thread_deterministic():
    """One thread and deterministic algorithms, as the bit-identical resume needs; restored afterwards."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


@dataclass
class Saved:
    """One checkpoint as the run wrote it."""

    step: int
    scale: float
    params: dict
    optimizer_state: dict


def parameter_names() -> list[str]:
    return [name for name, _ in snzoo.create_model("resnet20_sn", num_classes=10).named_parameters()]


def record_saves(monkeypatch: pytest.MonkeyPatch) -> list[Saved]:
    saves: list[Saved] = []
    names = parameter_names()
    save = engine.save_state

    def save_and_record(run_dir, **state):
        assert "scale" in state["scaler"], "the float16 run has no GradScaler state"
        saves.append(Saved(state["step"], float(state["scaler"]["scale"]),
                           {n: state["model"][n].clone() for n in names}, copy.deepcopy(state["optimizer"]["state"])))
        return save(run_dir, **state)

    monkeypatch.setattr(engine, "save_state", save_and_record)
    return saves


def record_loads(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    loads: list[dict] = []
    load = engine.load_state

    def load_and_record(run_dir):
        state = load(run_dir)
        loads.append(state)
        return state

    monkeypatch.setattr(engine, "load_state", load_and_record)
    return loads


def overflowing_init(tmp_path: Path) -> Path:
    """resnet20_sn weights with a 100-fold classifier: finite logits, float16 gradients that overflow at 2**16."""
    torch.manual_seed(0)
    model = snzoo.create_model("resnet20_sn", num_classes=10)
    with torch.no_grad():
        model.fc.weight.mul_(CLASSIFIER_GAIN)
    path = tmp_path / "init.pt"
    torch.save(model.state_dict(), path)
    return path


def amp_run(output: Path, init: Path, **options) -> TrainConfig:
    recipe = copy.deepcopy(RECIPE)
    recipe.update(epochs=1)
    return TrainConfig(name="resnet20_sn", recipe=recipe, data="fashion-mnist", output=output, init=str(init),
                       amp="float16", checkpoint_every=1, workers=0, seed=5, subset=SUBSET, val_subset=16,
                       deterministic=True, progress=False, **options)


def test_overflowing_steps_are_skipped_and_halve_the_scale(tmp_path, monkeypatch):
    saves = record_saves(monkeypatch)
    init = overflowing_init(tmp_path)
    train(amp_run(tmp_path / "run", init))
    assert [s.step for s in saves] == list(range(1, STEPS + 1))  # a checkpoint after every step
    assert saves[0].scale == INITIAL_SCALE / 2  # the very first step overflowed

    initial = torch.load(init, weights_only=True)
    previous_params, previous_scale = {n: initial[n] for n in saves[0].params}, INITIAL_SCALE
    skipped = taken = 0
    for saved in saves:
        if saved.scale < previous_scale:  # an overflow: the step is skipped, the scale halved
            assert saved.scale == previous_scale / 2, f"step {saved.step}"
            unchanged = [n for n in saved.params if torch.equal(saved.params[n], previous_params[n])]
            assert unchanged == list(saved.params), f"step {saved.step} skipped, yet weights changed"
            if not taken:
                assert saved.optimizer_state == {}, f"step {saved.step}: the optimizer stepped"
            skipped += 1
        else:  # a step taken: the weights move, the scale stays (it grows only after 2000 clean steps)
            assert saved.scale == previous_scale, f"step {saved.step}"
            assert any(not torch.equal(saved.params[n], previous_params[n]) for n in saved.params), \
                f"step {saved.step} taken, yet no weight changed"
            taken += 1
        previous_params, previous_scale = saved.params, saved.scale
    assert skipped >= 2 and taken >= 2, (skipped, taken)
    exported = weights(tmp_path / "run")
    assert all(torch.equal(exported[n], previous_params[n]) for n in previous_params)


def test_resume_restores_the_scaler_state(tmp_path, monkeypatch):
    """Interrupted after two overflowing steps (scale 2**14): the resumed run goes on from that scale, not from a
    fresh scaler's 2**16, and ends with the weights and scaler of the uninterrupted run, bit for bit."""
    cut = 2
    init = overflowing_init(tmp_path)
    saves, loads = record_saves(monkeypatch), record_loads(monkeypatch)
    train(amp_run(tmp_path / "straight", init))
    straight = list(saves)

    saves.clear()
    train(amp_run(tmp_path / "resumed", init, max_steps=cut))
    before = saves[-1]
    assert before.step == cut and before.scale == straight[cut - 1].scale == INITIAL_SCALE / 2 ** cut
    assert not loads

    saves.clear()
    train(amp_run(tmp_path / "resumed", init, resume=True))
    (loaded,) = loads
    assert loaded["step"] == cut and float(loaded["scaler"]["scale"]) == before.scale
    assert [(s.step, s.scale) for s in saves] == [(s.step, s.scale) for s in straight[cut:]]
    assert saves[0].scale in (before.scale, before.scale / 2)  # went on from the restored scale

    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    final = [torch.load(tmp_path / run / "state.pt", weights_only=True)["scaler"] for run in ("straight", "resumed")]
    assert final[0] == final[1]
