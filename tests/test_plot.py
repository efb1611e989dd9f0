"""Run logs (metrics.jsonl + TensorBoard), importance weights of SN layers, the figures and `snzoo plot`."""

import json
import math

import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

import snzoo
from snzoo.nn import SparseSwitchNorm2d, SwitchNorm1d, SwitchNorm2d
from snzoo.tools.plot import (
    TERM_COLORS,
    PlotError,
    importance_weights,
    plot_checkpoint,
    plot_importance,
    plot_run,
    short_layer_name,
)
from snzoo.train.run_log import MetricsLogError, RunLogger, read_metrics
from snzoo_cli.main import cli
from snzoo_cli.plot_commands import plot_command

if "plot" not in cli.commands:
    cli.add_command(plot_command)


def _hex_to_rgb(colour: str) -> tuple[int, int, int]:
    return tuple(int(colour[i : i + 2], 16) for i in (1, 3, 5))


def _png_colours(path) -> set:
    with Image.open(path) as img:
        assert img.format == "PNG"
        rgb = img.convert("RGB")
        return {colour for _, colour in rgb.getcolors(maxcolors=1 << 22)}


def _randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("mean_weight", "var_weight")):
                p.copy_(torch.randn(p.shape, generator=gen) * 2)
    return model


def _assert_same_weights(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name]["terms"] == b[name]["terms"], name
        assert a[name]["mean"] == pytest.approx(b[name]["mean"], abs=1e-6), name
        assert a[name]["var"] == pytest.approx(b[name]["var"], abs=1e-6), name


@pytest.fixture(scope="module")
def resnet18():
    return _randomised(snzoo.create_model("resnet18v1_sn"))


def _fake_run(run_dir, model=None, steps=60):
    with RunLogger(run_dir) as log:
        for step in range(steps):
            epoch = step // 20
            log.log(step, "train", epoch=epoch, loss=3 * math.exp(-step / 30) + 0.1 * (step % 3),
                    lr=0.1 * math.cos(step / steps * math.pi / 2), top1=40.0 + epoch * 5 + step % 20)
            if step % 20 == 19:
                log.log(step, "val", epoch=epoch, loss=2.0 - epoch * 0.3, top1=45.0 + epoch * 4)
        if model is not None:
            log.log_importance(steps - 1, model, epoch=epoch)


# ---------------------------------------------------------------------------------------------------------
# RunLogger


def test_run_logger_writes_json_lines_and_tensorboard_events(tmp_path):
    with RunLogger(tmp_path) as log:
        assert log.tensorboard_enabled
        log.log(0, "train", epoch=0, loss=2.5, lr=torch.tensor(0.1), top1=10)
        log.log(10, "train", loss=1.5, lr=0.05)
        log.log(10, "val", epoch=0, top1=33.25)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
    first = json.loads(lines[0])
    assert first["step"] == 0 and first["epoch"] == 0 and first["split"] == "train"
    assert first["loss"] == 2.5 and first["lr"] == pytest.approx(0.1) and first["top1"] == 10
    assert isinstance(first["time"], float) and first["time"] > 1.6e9
    assert "epoch" not in json.loads(lines[1])
    assert read_metrics(tmp_path) == [json.loads(line) for line in lines]

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/lr", "train/top1", "val/top1"} <= set(events.Tags()["scalars"])
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [0, 10]
    assert [e.value for e in loss] == pytest.approx([2.5, 1.5])
    assert [e.value for e in events.Scalars("val/top1")] == pytest.approx([33.25])


def test_only_rank_zero_writes_and_tensorboard_can_be_off(tmp_path):
    with RunLogger(tmp_path / "rank1", rank=1) as log:
        log.log(0, "train", loss=1.0)
    assert not (tmp_path / "rank1").exists()
    with RunLogger(tmp_path / "plain", tensorboard=False) as log:
        log.log(0, "train", loss=1.0)
    assert (tmp_path / "plain" / "metrics.jsonl").is_file()
    assert not (tmp_path / "plain" / "tensorboard").exists()


def test_non_finite_values_are_null_and_bad_values_refused(tmp_path):
    with RunLogger(tmp_path, tensorboard=False) as log:
        log.log(0, "train", loss=float("nan"), grad_norm=float("inf"), top1=1.0)
        with pytest.raises(ValueError, match="reserved"):
            log.log(1, "train", time=3.0)
        with pytest.raises(ValueError, match="must be a scalar"):
            log.log(1, "train", loss=torch.ones(2))
        with pytest.raises(TypeError, match="must be a number"):
            log.log(1, "train", loss="low")
    (record,) = read_metrics(tmp_path)
    assert record["loss"] is None and record["grad_norm"] is None and record["top1"] == 1.0


def test_truncated_last_line_is_tolerated_and_resume_appends(tmp_path):
    with RunLogger(tmp_path, tensorboard=False) as log:
        log.log(0, "train", loss=2.0)
        log.log(1, "train", loss=1.0)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "split": "tra')  # a process killed in the middle of a line
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1]

    with RunLogger(tmp_path, tensorboard=False) as log:  # the resumed run
        log.log(2, "train", loss=0.5)
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [(0, 2.0), (1, 1.0), (2, 0.5)]


def test_purge_step_drops_what_the_interrupted_run_logged_after_the_checkpoint(tmp_path):
    with RunLogger(tmp_path, tensorboard=False) as log:
        for step in range(6):
            log.log(step, "train", loss=float(step))
    with RunLogger(tmp_path, tensorboard=False, purge_step=3) as log:
        log.log(3, "train", loss=30.0)
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 30.0)]


def test_read_metrics_errors_are_one_line(tmp_path):
    with pytest.raises(MetricsLogError, match="does not exist"):
        read_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("step,loss\n0,1.0\n1,0.5\n")
    with pytest.raises(MetricsLogError, match=r"metrics.jsonl:1: not a JSON record"):
        read_metrics(tmp_path)


# ---------------------------------------------------------------------------------------------------------
# Importance weights


def test_importance_from_model_equals_state_dict_and_sums_to_one(resnet18):
    from_model = importance_weights(resnet18)
    from_state = importance_weights(resnet18.state_dict())
    assert list(from_model) == [name for name, _ in resnet18.named_modules() if isinstance(_, SwitchNorm2d)]
    assert list(from_model) == list(from_state) and len(from_model) == 20
    for name, layer in from_model.items():
        assert layer["terms"] == ["in", "ln", "bn"] == from_state[name]["terms"]
        assert layer["mean"] == pytest.approx(from_state[name]["mean"], abs=1e-6)
        assert layer["var"] == pytest.approx(from_state[name]["var"], abs=1e-6)
        assert sum(layer["mean"]) == pytest.approx(1.0) and sum(layer["var"]) == pytest.approx(1.0)
    # Randomised raw weights give unequal shares (the default init would give 1/3 each).
    assert from_model["layer3.1.sn2"]["mean"] != pytest.approx([1 / 3] * 3, abs=1e-3)


def test_layers_without_bn_have_two_terms():
    model = _randomised(snzoo.create_model("resnet18v1_sn", using_bn=False), seed=1)
    from_model, from_state = importance_weights(model), importance_weights(model.state_dict())
    assert from_model and all(layer["terms"] == ["in", "ln"] for layer in from_model.values())
    for layer in from_model.values():
        assert len(layer["mean"]) == 2 and sum(layer["var"]) == pytest.approx(1.0)
    _assert_same_weights(from_model, from_state)


def test_switchnorm1d_terms_come_from_the_model_and_ssn_state_dicts_use_sparsestmax():
    model = nn.Sequential(SwitchNorm1d(4), SparseSwitchNorm2d(4), SparseSwitchNorm2d(4))
    _randomised(model, seed=2)
    model[1].set_radius(0.3)
    with torch.no_grad():
        model[2].mean_weight.copy_(torch.tensor([0.0, 1.0, 0.0]))
        model[2].mean_fixed.fill_(1)
    from_model = importance_weights(model)
    assert from_model["0"]["terms"] == ["ln", "bn"]
    assert importance_weights(model.state_dict())["0"]["terms"] == ["in", "ln"]  # the documented limit of a bare state dict
    from_state = importance_weights(model.state_dict())
    _assert_same_weights({k: from_model[k] for k in ("1", "2")}, {k: from_state[k] for k in ("1", "2")})
    assert from_model["2"]["mean"] == [0.0, 1.0, 0.0]
    # sparsestmax, not softmax: a radius of 0.3 keeps the weights off the uniform softmax values.
    assert from_state["1"]["mean"] != pytest.approx(torch.softmax(model[1].mean_weight.detach(), 0).tolist())


def test_importance_of_a_wrapped_model_uses_plain_layer_names(resnet18):
    wrapped = nn.Module()
    wrapped.module = resnet18
    assert list(importance_weights(wrapped)) == list(importance_weights(resnet18))


def test_short_layer_names():
    assert short_layer_name("layer3.5.sn2") == "L3.5.sn2"
    assert short_layer_name("layer2.0.downsample.1") == "L2.0.ds"
    assert short_layer_name("sn1") == "sn1"


# ---------------------------------------------------------------------------------------------------------
# Figures


def test_plot_importance_writes_a_png_with_the_three_term_colours(tmp_path, resnet18):
    out = plot_importance(importance_weights(resnet18), tmp_path / "figs" / "imp.png", "resnet18v1_sn")
    assert out == tmp_path / "figs" / "imp.png"
    with Image.open(out) as img:
        width, height = img.size
        assert img.mode in ("RGB", "RGBA")
    assert width == 1000 and height >= 400  # grows with the number of layers
    colours = _png_colours(out)
    assert len(colours) > 10
    assert {_hex_to_rgb(c) for c in TERM_COLORS.values()} <= colours
    assert [p.name for p in (tmp_path / "figs").iterdir()] == ["imp.png"]  # no temporary file left behind


def test_plot_importance_of_nothing_is_an_error(tmp_path):
    with pytest.raises(PlotError, match="no SN layers"):
        plot_importance({}, tmp_path / "x.png", "empty")
    assert not (tmp_path / "x.png").exists()


def test_plot_run_writes_curves_and_the_last_importance(tmp_path, resnet18):
    _fake_run(tmp_path / "run", resnet18)
    files = plot_run(tmp_path / "run")
    assert [f.name for f in files] == ["loss.png", "top1.png", "lr.png", "importance.png"]
    assert all(f.parent == tmp_path / "run" / "plots" for f in files)
    for f in files:
        with Image.open(f) as img:
            assert img.size[0] >= 800 and img.size[1] >= 400
        assert len(_png_colours(f)) > 10
    assert {_hex_to_rgb(c) for c in TERM_COLORS.values()} <= _png_colours(files[-1])
    importance = [r for r in read_metrics(tmp_path / "run") if r["split"] == "importance"]
    assert len(importance) == 1 and importance[0]["step"] == 59
    _assert_same_weights(importance[0]["layers"], importance_weights(resnet18))


def test_plot_run_without_plottable_metrics_is_an_error(tmp_path):
    with RunLogger(tmp_path, tensorboard=False) as log:
        log.log(0, "train", grad_norm=1.0)
    with pytest.raises(PlotError, match="nothing to plot"):
        plot_run(tmp_path)


def test_plot_checkpoint_from_a_file(tmp_path, resnet18):
    torch.save({"state_dict": resnet18.state_dict(), "epoch": 3}, tmp_path / "ckpt.pth.tar")
    weights = plot_checkpoint(tmp_path / "ckpt.pth.tar", tmp_path / "imp.png")
    _assert_same_weights(weights, importance_weights(resnet18))
    assert len(_png_colours(tmp_path / "imp.png")) > 10


# ---------------------------------------------------------------------------------------------------------
# CLI


def test_cli_plots_a_run_directory(tmp_path, resnet18):
    _fake_run(tmp_path / "run", resnet18, steps=40)
    result = CliRunner().invoke(cli, ["plot", str(tmp_path / "run"), "--out", str(tmp_path / "out"), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["kind"] == "run"
    assert sorted(data["files"]) == sorted(str(tmp_path / "out" / n) for n in ("loss.png", "top1.png", "lr.png", "importance.png"))
    assert list(data["importance"]) == list(importance_weights(resnet18))


def test_cli_plots_a_checkpoint_into_the_current_directory(tmp_path, monkeypatch, resnet18):
    torch.save(resnet18.state_dict(), tmp_path / "model_best.pth")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(plot_command, [str(tmp_path / "model_best.pth")])
    assert result.exit_code == 0, result.output
    out = tmp_path / "model_best-importance.png"
    assert result.output.strip() == str(out)
    assert {_hex_to_rgb(c) for c in TERM_COLORS.values()} <= _png_colours(out)


@pytest.mark.parametrize("target", ["missing/ckpt.pth", "no_such_model_sn"])
def test_cli_missing_target_is_one_line_with_exit_code_1(tmp_path, monkeypatch, target):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["plot", target])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert list(tmp_path.iterdir()) == []
