"""Throughput measurement (snzoo.tools.bench, `snzoo bench`) and the straightforward SN anchor of the benchmarks.

Only the shape and sanity of the numbers are checked, never their size: timings depend on the machine.
"""

import copy
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import snzoo
from snzoo.tools.bench import BenchmarkError, benchmark_model
from snzoo.nn import SwitchNorm2d, cpu_kernels
from snzoo.nn import functional as sn_functional
from snzoo_cli.bench_commands import bench_command
from snzoo_cli.main import cli

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from straightforward_sn import StraightforwardSwitchNorm2d, swap_in_straightforward  # noqa: E402

if "bench" not in cli.commands:
    cli.add_command(bench_command)

SMALL = dict(batch=2, size=28, steps=2, warmup=1)


def run(*args):
    return CliRunner().invoke(cli, list(args))


def _check_throughputs(result: dict) -> None:
    for key in ("eval_images_per_s", "train_images_per_s", "eval_ms_per_batch", "train_ms_per_step"):
        assert math.isfinite(result[key]) and result[key] > 0, key


def test_benchmark_model_reports_throughputs_and_settings():
    result = benchmark_model("resnet20_sn", **SMALL)
    _check_throughputs(result)
    assert result["model"] == "resnet20_sn"
    assert {k: result[k] for k in ("batch", "size", "steps", "warmup", "device", "amp", "channels_last")} == {
        "batch": 2, "size": 28, "steps": 2, "warmup": 1, "device": "cpu", "amp": None, "channels_last": False}
    assert result["in_chans"] == 1 and result["num_classes"] == 10  # the CIFAR-style model's defaults
    assert result["threads"] == torch.get_num_threads() and result["torch"] == torch.__version__
    assert result["sn_cpu_kernel"] is True  # built here (tests/test_cpu_kernel.py)
    with cpu_kernels.use_kernel(False):
        assert benchmark_model("resnet20_sn", **SMALL)["sn_cpu_kernel"] is False
    json.dumps(result)


def test_benchmark_model_imagenet_model_amp_channels_last():
    result = benchmark_model("resnet18v1_sn", batch=2, size=32, steps=2, warmup=1, amp="bfloat16", channels_last=True)
    _check_throughputs(result)
    assert result["in_chans"] == 3 and result["num_classes"] == 1000
    assert result["amp"] == "bfloat16" and result["channels_last"] is True


def test_benchmark_model_takes_an_entry_name_and_its_class_count():
    entry = snzoo.get_entry("resnet50v1_sn")
    result = benchmark_model(entry.name, batch=2, size=32, steps=1, warmup=0)
    _check_throughputs(result)
    assert result["model"] == entry.name and result["num_classes"] == entry.num_classes


def test_benchmark_model_leaves_a_given_model_untouched():
    torch.manual_seed(0)
    model = snzoo.create_model("resnet20_sn")
    before = copy.deepcopy(model.state_dict())
    result = benchmark_model(model, **SMALL)
    _check_throughputs(result)
    assert result["model"] == "resnet20_sn"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("settings", [dict(batch=0), dict(steps=0), dict(amp="int8"), dict(device="nonsense")])
def test_benchmark_model_refuses_bad_settings(settings):
    with pytest.raises(BenchmarkError):
        benchmark_model("resnet20_sn", **{**SMALL, **settings})


def test_cli_prints_throughputs():
    result = run("bench", "resnet20_sn", "--batch", "2", "--size", "28", "--steps", "2", "--warmup", "1")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("resnet20_sn: eval ")
    assert "img/s" in result.output and "train" in result.output and "batch 2" in result.output
    assert "SN implementation fused (eval on the CPU kernel)" in result.output


def test_cli_json():
    result = run("bench", "resnet20_sn", "--batch", "2", "--size", "28", "--steps", "2", "--warmup", "1", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    _check_throughputs(data)
    assert data["batch"] == 2 and data["size"] == 28 and data["model"] == "resnet20_sn"


def test_cli_unknown_name_is_one_line_error():
    result = run("bench", "resnet50v1_sm")
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown") and "resnet50v1_sn" in lines[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without a GPU")
def test_cli_missing_gpu_is_one_line_error():
    result = run("bench", "resnet20_sn", "--device", "cuda")
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "--device cpu" in lines[0]


# ---------------------------------------------------------------------------------------- the anchor
def _randomise_sn(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial SN state, so that every term and buffer matters in the comparison."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, SwitchNorm2d):
                for tensor in (module.mean_weight, module.var_weight, module.bias):
                    tensor.copy_(torch.randn(tensor.shape, generator=generator))
                module.weight.copy_(1 + 0.2 * torch.randn(module.weight.shape, generator=generator))
                if module.using_bn:
                    module.running_mean.copy_(0.1 * torch.randn(module.running_mean.shape, generator=generator))
                    module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=generator))


def _implementations():
    return list(sn_functional.IMPLEMENTATIONS)


def _model_and_anchor(name, **overrides):
    torch.manual_seed(0)
    ours = snzoo.create_model(name, **overrides)
    _randomise_sn(ours)
    anchor = swap_in_straightforward(copy.deepcopy(ours))
    return ours, anchor


def _train_forward(model, x):
    torch.manual_seed(2)  # the same dropout mask in the ImageNet models' head
    return model.train()(x)


@pytest.mark.parametrize("name, size, overrides", [
    ("resnet20_sn", 28, {}),
    ("resnet18v1_sn", 64, {}),
    ("resnet20_sn", 28, {"using_bn": False}),
    ("resnet20_sn", 28, {"using_moving_average": False}),
])
def test_straightforward_swap_matches_snzoo_reference(name, size, overrides):
    """Same state_dict keys, outputs, running buffers and gradients as snzoo's reference SN."""
    ours, anchor = _model_and_anchor(name, **overrides)
    assert not any(isinstance(m, SwitchNorm2d) for m in anchor.modules())
    assert sum(isinstance(m, StraightforwardSwitchNorm2d) for m in anchor.modules()) == sum(
        isinstance(m, SwitchNorm2d) for m in ours.modules())
    assert list(anchor.state_dict()) == list(ours.state_dict())

    x = torch.randn(2, ours.conv1.in_channels, size, size, generator=torch.Generator().manual_seed(1))
    with sn_functional.use_implementation("reference"):
        with torch.no_grad():
            torch.testing.assert_close(anchor.eval()(x), ours.eval()(x), rtol=1e-5, atol=1e-5)
        out_ours, out_anchor = _train_forward(ours, x), _train_forward(anchor, x)
        torch.testing.assert_close(out_anchor, out_ours, rtol=1e-5, atol=1e-5)
        out_ours.square().sum().backward()
        out_anchor.square().sum().backward()
    state_ours, state_anchor = ours.state_dict(), anchor.state_dict()
    for key in state_ours:  # running buffers updated alike
        torch.testing.assert_close(state_anchor[key], state_ours[key], rtol=1e-5, atol=1e-6, msg=key)
    grads_ours = dict(ours.named_parameters())
    for key, param in anchor.named_parameters():
        torch.testing.assert_close(param.grad, grads_ours[key].grad, rtol=1e-5, atol=1e-5, msg=key)


@pytest.mark.parametrize("implementation", _implementations())
@pytest.mark.parametrize("name, size", [("resnet20_sn", 28), ("resnet18v1_sn", 64)])
def test_straightforward_outputs_match_every_snzoo_implementation(implementation, name, size):
    ours, anchor = _model_and_anchor(name)
    x = torch.randn(2, ours.conv1.in_channels, size, size, generator=torch.Generator().manual_seed(1))
    with sn_functional.use_implementation(implementation):
        with torch.no_grad():
            torch.testing.assert_close(anchor.eval()(x), ours.eval()(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(_train_forward(anchor, x), _train_forward(ours, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("using_bn", [True, False])
@pytest.mark.parametrize("spatial", [(5, 7), (1, 1)])
def test_straightforward_layer_matches_snzoo_layer(using_bn, spatial):
    layer = SwitchNorm2d(6, momentum=0.8, using_bn=using_bn)
    _randomise_sn(layer, seed=3)
    anchor = swap_in_straightforward(copy.deepcopy(layer))
    assert isinstance(anchor, StraightforwardSwitchNorm2d)
    x = torch.randn(4, 6, *spatial, generator=torch.Generator().manual_seed(2), requires_grad=True)
    x_anchor = x.detach().clone().requires_grad_(True)
    for training in (True, False):
        layer.train(training), anchor.train(training)
        with sn_functional.use_implementation("reference"):
            y, y_anchor = layer(x), anchor(x_anchor)
        torch.testing.assert_close(y_anchor, y, rtol=1e-5, atol=1e-5)
        y.pow(3).sum().backward()
        y_anchor.pow(3).sum().backward()
        torch.testing.assert_close(x_anchor.grad, x.grad, rtol=1e-5, atol=1e-5)
    for key, value in layer.state_dict().items():
        torch.testing.assert_close(anchor.state_dict()[key], value, msg=key)


def test_swap_refuses_ghost_batches():
    model = snzoo.create_model("resnet20_sn")
    snzoo.nn.set_ghost_batch_size(model, 2)
    with pytest.raises(ValueError, match="ghost"):
        swap_in_straightforward(model)
