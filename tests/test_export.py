"""ONNX and TorchScript export: outputs equal eager ones on photographs, the graph is the fused eval path, CLI.

What the graph tests assert, per SN layer (its nodes are those named under the layer's module scope, e.g.
`/layer1/layer1.0/sn1/`), and why that shows the fused formulation y = x * scale + shift:
- the layer's output is an Add whose operands are a full-size Mul and a per-(sample, channel) tensor, and that
  Mul multiplies the layer's input itself by a per-(sample, channel) tensor: one multiply-add on the activation;
- no full-size node divides, takes a root or a power, and there is one full-size Add: the normalised
  activation (x - mean) / sqrt(var + eps) is never formed (the reference path has a full-size Sub and Div);
- no reduction in the layer includes axis 0, and the mixed running mean p_bn * running_mean is a constant of
  the graph: the BN term comes from the running statistics, not the batch;
- the whole graph has no Softmax and none of sparsestmax's ops (sort, cumsum, nonzero) or control flow: the
  importance weights are constants; SSN layers left with the BN term only are a Mul and an Add by constants.
"Full-size" means a tensor with more than one element per (sample, channel), by ONNX shape inference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections import Counter, defaultdict

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import snzoo
from snzoo.export import ExportError, FrozenSwitchNorm, check_export, export_onnx, export_torchscript, frozen_copy
from snzoo.export.exporters import _write_atomically
from snzoo.models import ResNet
from snzoo.nn import (
    SparseSwitchNorm2d,
    SwitchNorm1d,
    SwitchNorm2d,
    SwitchNorm3d,
    set_sparsestmax_radius,
    switchnorm_layers,
)
from snzoo_cli.export_commands import export_command
from snzoo_cli.main import cli

from photos import photo_batch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

if "export" not in cli.commands:
    cli.add_command(export_command)

TOL = 1e-4
SIZE = 64
FORBIDDEN_OPS = {"Softmax", "LogSoftmax", "TopK", "CumSum", "NonZero", "ArgMax", "OneHot", "If", "Loop", "Where"}


pytestmark = pytest.mark.usefixtures("one_thread")


def _randomize(model, seed):
    """Random importance weights, affine parameters and running statistics; eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in switchnorm_layers(model):
            for raw in (layer.mean_weight, layer.var_weight):
                raw.copy_(1.5 * torch.randn(raw.shape, generator=g))
            layer.weight.copy_(0.5 + torch.rand(layer.weight.shape, generator=g))
            layer.bias.copy_(0.2 * torch.randn(layer.bias.shape, generator=g))
            if layer.using_bn:
                layer.running_mean.copy_(0.5 * torch.randn(layer.running_mean.shape, generator=g))
                layer.running_var.copy_(0.5 + 1.5 * torch.rand(layer.running_var.shape, generator=g))
    return model.eval()


def _ssn_model():
    model = _randomize(ResNet(depth=18, norm="ssn"), seed=2)
    set_sparsestmax_radius(model, 0.3)
    with torch.no_grad():
        # A layer fixed to BN only (a constant affine map once exported) and one fixed to IN mean / LN variance.
        bn_only, mixed = model.layer1[0].sn2, model.layer2[0].sn1
        bn_only.mean_weight.copy_(torch.tensor([0.0, 0.0, 1.0]))
        bn_only.var_weight.copy_(torch.tensor([0.0, 0.0, 1.0]))
        mixed.mean_weight.copy_(torch.tensor([1.0, 0.0, 0.0]))
        mixed.var_weight.copy_(torch.tensor([0.0, 1.0, 0.0]))
        for layer in (bn_only, mixed):
            layer.mean_fixed.fill_(1)
            layer.var_fixed.fill_(1)
    return model


MODELS = {
    "resnet18v1_sn": lambda: _randomize(snzoo.create_model("resnet18v1_sn"), seed=0),
    "resnet18v1_sn_no_bn": lambda: _randomize(snzoo.create_model("resnet18v1_sn", using_bn=False), seed=1),
    "resnet18v1_ssn": _ssn_model,
}


@pytest.fixture(scope="module")
def photos():
    return {n: photo_batch(SIZE, count=n) for n in (2, 3)}


@pytest.fixture(scope="module", params=sorted(MODELS))
def exported(request, tmp_path_factory):
    """(model, ONNX file exported at batch 1) for each model kind."""
    model = MODELS[request.param]()
    path = export_onnx(model, tmp_path_factory.mktemp("onnx") / f"{request.param}.onnx", size=SIZE)
    return request.param, model, path


# -------------------------------------------------------------------------------------------- outputs
def test_onnx_matches_eager_on_photos_at_other_batch_sizes(exported, photos):
    _, model, path = exported
    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input] == ["input"] and [o.name for o in proto.graph.output] == ["logits"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a named, free batch axis
    assert max(op.version for op in proto.opset_import if op.domain in ("", "ai.onnx")) >= 17
    for batch in (2, 3):  # exported with batch 1
        assert check_export(model, path, photos[batch]) < TOL


def test_torchscript_trace_matches_eager(exported, photos, tmp_path):
    name, model, _ = exported
    path = export_torchscript(model, tmp_path / f"{name}.pt", size=SIZE)
    for batch in (2, 3):
        assert check_export(model, path, photos[batch]) < TOL


def test_torchscript_script_keeps_sn_layers_right_at_other_sizes(tmp_path):
    # Scripted SN layers keep the IN statistics' branch for one-pixel maps (layer4 is 1x1 at 32x32 input).
    model = MODELS["resnet18v1_sn"]()
    path = export_torchscript(model, tmp_path / "m.pt", size=SIZE, method="script")
    assert check_export(model, path, photo_batch(SIZE, count=2)) < TOL
    assert check_export(model, path, photo_batch(32, count=2)) < TOL


def test_cifar_resnet_with_one_input_channel(tmp_path):
    model = _randomize(snzoo.create_model("resnet20_sn"), seed=3)
    gray = photo_batch(28, count=3).mean(1, keepdim=True)  # real photographs, one channel
    onnx_path = export_onnx(model, tmp_path / "r20.onnx", size=28, in_chans=1)
    ts_path = export_torchscript(model, tmp_path / "r20.pt", size=28)
    assert check_export(model, onnx_path, gray) < TOL
    assert check_export(model, ts_path, gray[:2]) < TOL
    with pytest.raises(ExportError, match="first convolution takes 1 channels"):
        export_onnx(model, tmp_path / "bad.onnx", size=28, in_chans=3)


def test_freshly_initialised_model_runs_in_onnxruntime(tmp_path):
    # Equal-valued parameters (all SN weights are ones) are stored once by the exporter; the file must still load.
    model = snzoo.create_model("resnet20_sn").eval()
    gray = photo_batch(28, count=2).mean(1, keepdim=True)
    assert check_export(model, export_onnx(model, tmp_path / "fresh.onnx", size=28), gray) < TOL


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
@pytest.mark.parametrize(
    "layer,shape",
    [
        (SwitchNorm2d(6), (4, 6, 5, 5)),
        (SwitchNorm2d(6), (4, 6, 1, 1)),
        (SwitchNorm2d(6, using_bn=False), (4, 6, 3, 3)),
        (SwitchNorm3d(6), (4, 6, 2, 3, 3)),
        (SwitchNorm1d(6), (4, 6)),
        (SwitchNorm1d(6), (4, 6, 5)),
        (SparseSwitchNorm2d(6), (4, 6, 5, 5)),
    ],
)
def test_frozen_layer_equals_every_sn_layer_in_eval(layer, shape):
    _randomize(layer, seed=4)
    if isinstance(layer, SparseSwitchNorm2d):
        layer.set_radius(0.2)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5)) * 3 + 1
    frozen = frozen_copy(layer)
    assert isinstance(frozen, FrozenSwitchNorm)
    with torch.no_grad():
        expected = layer(x)
        assert torch.allclose(frozen(x), expected, atol=1e-5)
        assert torch.allclose(torch.jit.script(frozen)(x), expected, atol=1e-5)


# -------------------------------------------------------------------------------------------- graph
class _Graph:
    def __init__(self, path):
        proto = onnx.shape_inference.infer_shapes(onnx.load(str(path)), data_prop=True)
        g = proto.graph
        self.nodes = list(g.node)
        self.outputs = {o.name for o in g.output}
        self.producer = {o: n for n in self.nodes for o in n.output}
        self.consumers = defaultdict(list)
        for node in self.nodes:
            for name in node.input:
                self.consumers[name].append(node)
        self.constants = {t.name: onnx.numpy_helper.to_array(t) for t in g.initializer}
        for node in self.nodes:  # in topological order
            if node.op_type == "Constant":
                self.constants[node.output[0]] = onnx.numpy_helper.to_array(node.attribute[0].t)
            elif node.op_type == "Identity" and node.input[0] in self.constants:  # deduplicated initializers
                self.constants[node.output[0]] = self.constants[node.input[0]]
        self.shapes = {
            v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*g.value_info, *g.input, *g.output]
        }

    def is_full(self, name):
        shape = self.shapes.get(name)
        return shape is not None and len(shape) >= 3 and any(d != 1 for d in shape[2:])

    def reduced_axes(self, node):
        for attr in node.attribute:
            if attr.name == "axes":
                return list(attr.ints)
        if len(node.input) > 1 and node.input[1]:
            return [int(a) for a in self.constants[node.input[1]].ravel()]
        return None  # all axes


def _scope(module_name):
    """The exporter's node-name prefix of a module: `layer1.0.sn1` -> `/layer1/layer1.0/sn1/`."""
    parts = module_name.split(".")
    # A child of a Sequential is named with its parent's attribute, e.g. `downsample.1`.
    return "/" + "/".join(f"{parts[i - 1]}.{p}" if p.isdigit() else p for i, p in enumerate(parts)) + "/"


def _assert_fused_layer(graph, scope):
    """Check one SN layer's nodes (see the module docstring); returns them and the scale and shift operands."""
    nodes = [n for n in graph.nodes if n.name.startswith(scope)]
    assert nodes, f"no nodes under {scope}"
    full_ops = Counter(n.op_type for n in nodes if any(graph.is_full(o) for o in n.output))
    assert not full_ops.keys() & {"Div", "Sqrt", "Pow", "Reciprocal", "Exp", "Log"}, f"{scope} full-size: {full_ops}"
    assert full_ops["Add"] == 1, f"{scope} full-size: {full_ops}"
    for node in nodes:
        if node.op_type.startswith("Reduce") and len(graph.shapes.get(node.input[0], ())) >= 2:  # not shape vectors
            axes = graph.reduced_axes(node)
            assert axes is not None and 0 not in axes, f"{node.name} reduces over the batch axis"

    produced = {o for n in nodes for o in n.output}
    (x,) = {i for n in nodes for i in n.input if i and i not in produced and i not in graph.constants}
    (y,) = [o for o in produced if o in graph.outputs or any(not c.name.startswith(scope) for c in graph.consumers[o])]
    add = graph.producer[y]
    assert add.op_type == "Add", (scope, add.op_type)
    product, shift = sorted(add.input, key=graph.is_full, reverse=True)
    assert graph.is_full(product) and not graph.is_full(shift), scope
    mul = graph.producer[product]
    assert mul.op_type == "Mul" and mul.name.startswith(scope), scope
    assert x in mul.input, f"{scope}: the output Mul does not read the layer input"
    (scale,) = [i for i in mul.input if i != x]
    assert not graph.is_full(scale), scope
    return nodes, scale, shift


def test_onnx_graph_is_the_fused_eval_formulation(exported):
    name, model, path = exported
    graph = _Graph(path)
    ops = Counter(n.op_type for n in graph.nodes)
    assert not ops.keys() & FORBIDDEN_OPS, ops
    layers = {n: m for n, m in model.named_modules() if m in switchnorm_layers(model)}
    affine_only = 0
    for module_name, layer in layers.items():
        nodes, scale, shift = _assert_fused_layer(graph, _scope(module_name))
        if isinstance(layer, SparseSwitchNorm2d):
            with torch.no_grad():
                mean_probs, var_probs = layer.importance_weights()
            if mean_probs[:2].sum() == 0 and var_probs[:2].sum() == 0:
                # BN term only: no per-sample statistics, a multiply-add by constants.
                affine_only += 1
                assert {n.op_type for n in nodes} <= {"Mul", "Add", "Unsqueeze", "Constant"}, module_name
                assert scale in graph.constants and shift in graph.constants, module_name
        elif layer.using_bn:
            p_bn = torch.softmax(layer.mean_weight.detach(), 0)[2]
            mixed_mean = (p_bn * layer.running_mean).reshape(1, -1).numpy()
            used = [graph.constants[i] for n in nodes for i in n.input if i in graph.constants]
            assert any(c.shape == mixed_mean.shape and np.allclose(c, mixed_mean, atol=1e-6) for c in used), module_name
    assert affine_only == (1 if name == "resnet18v1_ssn" else 0)
    # A layer per norm of ResNet-18: stem, 2 per block, 3 shortcut projections.
    assert len(layers) == 20


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_graph_checks_reject_the_unfused_reference_formulation(tmp_path):
    # The checks above must tell the formulations apart: the reference path, exported as it is, fails them.
    from snzoo.nn import functional as F_sn

    model = _randomize(snzoo.create_model("resnet20_sn"), seed=3)
    previous = F_sn.set_implementation("reference") if hasattr(F_sn, "set_implementation") else None
    try:
        torch.onnx.export(model, (torch.randn(1, 1, 28, 28),), str(tmp_path / "ref.onnx"), dynamo=False, opset_version=17)
    finally:
        if previous is not None:
            F_sn.set_implementation(previous)
    graph = _Graph(tmp_path / "ref.onnx")
    with pytest.raises(AssertionError, match="'Div'"):  # (x - mean) / sqrt(var + eps) on the full tensor
        _assert_fused_layer(graph, _scope("layer1.0.sn1"))


# -------------------------------------------------------------------------------------------- user's model
def test_export_leaves_the_model_unchanged(tmp_path, photos):
    model = _ssn_model()
    set_sparsestmax_radius(model, 1.0)  # one-hot weights: a training step would fix them; an export must not
    model.train()
    model.layer1.requires_grad_(False)
    model.fc.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = [(p, p.requires_grad) for p in model.parameters()]
    flags = [(m, m.training) for m in model.modules()]
    export_onnx(model, tmp_path / "m.onnx", size=SIZE)
    path = export_torchscript(model, tmp_path / "m.pt", size=SIZE, method="script")
    check_export(model, path, photos[2])
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert [(p, p.requires_grad) for p in model.parameters()] == params
    assert all(m.training == training for m, training in flags)
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.pt"]  # no temporary files left


class MedianPool(nn.Module):
    """Median over the spatial positions: runs in eager mode, and no ONNX opset has an operator for it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).median(dim=2).values


def _median_pooled_resnet20() -> nn.Module:
    model = _randomize(snzoo.create_model("resnet20_sn"), seed=3)
    model.avgpool = MedianPool()
    return model


UNSUPPORTED_MEDIAN = ("UnsupportedOperatorError: Exporting the operator 'aten::median' to ONNX opset version 17 "
                      "is not supported")


def test_untraceable_model_fails_in_one_line_and_keeps_the_old_file(tmp_path, capfd):
    model = _median_pooled_resnet20()
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)  # a working model, only not exportable
    out = tmp_path / "m.onnx"
    out.write_bytes(b"old")
    with pytest.raises(ExportError) as info:
        export_onnx(model, out, size=28)
    assert str(info.value) == f"ONNX export of resnet20_sn failed: {UNSUPPORTED_MEDIAN}"
    assert out.read_bytes() == b"old" and os.listdir(tmp_path) == ["m.onnx"]
    # The exporter's dump of the whole graph (hundreds of lines, written by C++ to fd 1) must not reach the user.
    printed = capfd.readouterr()
    assert "Torch IR graph" not in printed.out + printed.err


def test_a_write_that_fails_half_way_leaves_the_old_file_and_no_temporary(tmp_path):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"old")

    def write_half_then_fail(tmp):
        tmp.write_bytes(b"partial")
        raise ExportError("disk full")

    with pytest.raises(ExportError, match="^disk full$"):
        _write_atomically(out, write_half_then_fail)
    assert out.read_bytes() == b"old" and os.listdir(tmp_path) == ["m.onnx"]


def test_bad_export_arguments_are_refused_before_exporting(tmp_path):
    model = _randomize(snzoo.create_model("resnet20_sn"), seed=3)
    with pytest.raises(ExportError, match="opset 17 or later"):
        export_onnx(model, tmp_path / "m.onnx", size=28, opset=13)
    with pytest.raises(ExportError, match="method must be one of trace, script"):
        export_torchscript(model, tmp_path / "m.pt", size=28, method="compile")
    assert os.listdir(tmp_path) == []


# -------------------------------------------------------------------------------------------- CLI
@pytest.fixture()
def checkpoint(tmp_path):
    model = _randomize(snzoo.create_model("resnet20_sn"), seed=6)
    path = tmp_path / "r20.pth"
    torch.save(model.state_dict(), path)
    return path


def _run(*args):
    return CliRunner().invoke(cli, list(args))


def test_cli_exports_an_architecture_with_a_checkpoint(tmp_path, checkpoint):
    out = tmp_path / "out" / "r20.onnx"
    result = _run("export", "resnet20_sn", str(out), "--checkpoint", str(checkpoint), "--size", "28", "--check", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["path"] == str(out) and out.is_file() and report["format"] == "onnx" and report["opset"] == 17
    assert report["architecture"] == "resnet20_sn" and report["bytes"] == out.stat().st_size
    assert report["max_abs_diff"] < TOL

    out = tmp_path / "r20.pt"
    result = _run("export", "resnet20_sn", str(out), "--format", "torchscript", "--checkpoint", str(checkpoint),
                  "--size", "28", "--check")
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"{out}: torchscript export of resnet20_sn at 28x28")
    assert "max |exported - eager|" in result.output


def test_cli_bad_format_is_a_usage_error(tmp_path):
    result = _run("export", "resnet20_sn", str(tmp_path / "m.bin"), "--format", "tflite")
    assert result.exit_code == 2
    assert "Usage:" in result.output and "'--format'" in result.output


def test_cli_failing_export_is_one_line(tmp_path, checkpoint):
    args = ["export", "resnet20_sn", str(tmp_path / "m.onnx"), "--checkpoint", str(checkpoint), "--size", "28"]
    result = _run(*args, "--opset", "13")
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == ["error: ONNX export needs opset 17 or later, got 13"]

    # A real untraceable architecture, registered in a fresh `snzoo` process so its real output is seen.
    script = textwrap.dedent("""
        import sys
        from torch import nn
        from snzoo.models.registry import register_architecture
        from snzoo.models.resnet_cifar import ResNetCifar
        from snzoo_cli.main import main

        class MedianPool(nn.Module):
            def forward(self, x):
                return x.flatten(2).median(dim=2).values

        def median_pooled(**kwargs):
            model = ResNetCifar(**kwargs)
            model.avgpool = MedianPool()
            return model

        register_architecture("resnet20median_sn", 20, 1, "sn", median_pooled)
        sys.argv[0] = "snzoo"
        main()
    """)
    out = tmp_path / "median.onnx"
    result = subprocess.run(
        [sys.executable, "-c", script, "export", "resnet20median_sn", str(out), "--checkpoint", str(checkpoint),
         "--size", "28"], capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == f"error: ONNX export of resnet20median_sn failed: {UNSUPPORTED_MEDIAN}\n"
    assert not out.exists()
    # A published model whose weights are not in the (empty, offline) cache.
    result = _run("export", "resnet50v1_sn.in1k_8x32_cos120", str(tmp_path / "m.onnx"))
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
