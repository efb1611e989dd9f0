"""norm_relu: an SN layer's ReLU (and a residual block's `+ shortcut`) inside the kernel's operator, with the values
and gradients of the separate operations, bit for bit; and the separate operations wherever that does not apply."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import snzoo
from snzoo.models.resnet import BasicBlockV1, BottleneckV1
from snzoo.models.norms import NormFactory
from snzoo.nn import SparseSwitchNorm2d, SwitchNorm2d, SwitchNormAct2d, cpu_kernels, norm_relu

try:  # tests/ as a package or as a plain directory on sys.path
    from .sn_testing import fashion_mnist_batch, randomise, spread_input
except ImportError:
    from sn_testing import fashion_mnist_batch, randomise, spread_input


pytestmark = pytest.mark.usefixtures("kernel_built")


LAYERS = {
    "sn": lambda: SwitchNorm2d(6),
    "sn_no_bn": lambda: SwitchNorm2d(6, using_bn=False),
    "ssn": lambda: SparseSwitchNorm2d(6),
}
SHAPE = (3, 6, 5, 7)


def _inputs(dtype, layout, seed=2):
    x = spread_input(SHAPE, dtype, seed=seed)
    # the residual centred on 0, so that the sums before the ReLU have both signs
    residual = spread_input(SHAPE, dtype, seed=seed + 1, mean=-0.3)
    if layout == "channels_last":
        x, residual = (t.contiguous(memory_format=torch.channels_last) for t in (x, residual))
    return x, residual


def _separate(layer, x, residual):
    y = layer(x)
    return torch.relu(y if residual is None else y + residual)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_eval_is_one_operator_call_with_the_separate_values(kind, with_residual, layout, dtype, kernel_calls):
    layer = randomise(LAYERS[kind](), seed=1, buffers=True).eval().to(dtype)
    x, residual = _inputs(dtype, layout)
    residual = residual if with_residual else None
    with torch.no_grad():
        expected = _separate(layer, x, residual)
        kernel_calls.clear()
        fused = norm_relu(layer, nn.ReLU(inplace=True), x, residual)
    assert len(kernel_calls) == 1 and kernel_calls[0]["relu"] and (kernel_calls[0]["residual"] is residual)
    assert (expected < 0).sum() == 0 and (fused == 0).any()  # the clamp did something
    assert torch.equal(fused, expected)
    assert fused.stride() == expected.stride()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("kind", ["sn", "sn_no_bn"])
def test_training_equals_the_separate_operations(kind, with_residual, layout, dtype, kernel_calls):
    """Output, every gradient (input, residual, weight, bias, raw importance weights) and the running buffers' update
    bit for bit, through the operator's own backward."""
    fused_layer = randomise(LAYERS[kind](), seed=3, buffers=True).train().to(dtype)
    separate_layer = copy.deepcopy(fused_layer)
    x, residual = _inputs(dtype, layout, seed=4)
    grad_y = spread_input(SHAPE, dtype, seed=6, mean=0.0)

    def run(layer, fused):
        xs = x.clone().requires_grad_(True)
        rs = residual.clone().requires_grad_(True) if with_residual else None
        kernel_calls.clear()
        y = norm_relu(layer, nn.ReLU(inplace=True), xs, rs) if fused else _separate(layer, xs, rs)
        calls = list(kernel_calls)
        y.backward(grad_y)
        grads = [xs.grad] + ([rs.grad] if with_residual else []) + [p.grad for p in layer.parameters()]
        return y.detach(), grads, calls

    y_fused, grads_fused, calls = run(fused_layer, True)
    y_separate, grads_separate, _ = run(separate_layer, False)
    assert len(calls) == 1 and calls[0]["relu"] is True
    assert (y_fused == 0).any() and (y_fused > 0).any()
    assert torch.equal(y_fused, y_separate)
    assert len(grads_fused) == len(grads_separate)
    for fused_grad, separate_grad in zip(grads_fused, grads_separate):
        assert torch.equal(fused_grad, separate_grad)
    for a, b in zip(fused_layer.buffers(), separate_layer.buffers()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("residual_grad", [True, False])
def test_gradcheck_of_the_operator_with_relu_and_residual(training, channels_last, residual_grad):
    """float64 finite differences through the clamp and the sum: input, residual, weight, bias, raw weights."""
    g = torch.Generator().manual_seed(40)
    shape = (3, 4, 3, 2)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    residual = torch.randn(shape, generator=g, dtype=torch.float64) * 0.5
    if channels_last:
        x, residual = (t.contiguous(memory_format=torch.channels_last) for t in (x, residual))
    weight = torch.randn(1, 4, 1, 1, generator=g, dtype=torch.float64) + 1
    bias = torch.randn(1, 4, 1, 1, generator=g, dtype=torch.float64)
    raw = [torch.randn(3, generator=g, dtype=torch.float64) for _ in range(2)]
    rm = torch.randn(1, 4, 1, generator=g, dtype=torch.float64)
    rv = torch.rand(1, 4, 1, generator=g, dtype=torch.float64) + 0.5
    inputs = [t.requires_grad_(True) for t in (x, weight, bias, *raw)] + [residual.requires_grad_(residual_grad)]

    def layer(x, weight, bias, mean_raw, var_raw, residual):
        return cpu_kernels.switch_norm(x, weight, bias, mean_raw, var_raw, [0, 1, 2], 3, rm.clone(), rv.clone(),
                                       training, 0.9, True, 1e-5, True, relu=True, residual=residual)

    out = layer(*inputs)
    assert (out == 0).any() and (out > 0).any()
    assert torch.autograd.gradcheck(layer, tuple(inputs), eps=1e-6, atol=1e-7)


def test_nan_stays_nan_as_torch_relu_keeps_it():
    layer = randomise(SwitchNorm2d(6), seed=7, buffers=True).eval()
    x, residual = _inputs(torch.float32, "contiguous", seed=8)
    x[1, 2, 3, 4] = float("nan")  # sample 1's statistics become NaN: its whole output is NaN
    residual[0, 0, 0, 0] = float("nan")
    with torch.no_grad():
        expected = _separate(layer, x, residual)
        fused = norm_relu(layer, nn.ReLU(), x, residual)
    assert expected.isnan().any()
    torch.testing.assert_close(fused, expected, rtol=0, atol=0, equal_nan=True)


def test_hooks_see_the_separate_calls(kernel_calls):
    layer = randomise(SwitchNorm2d(6), seed=9, buffers=True).eval()
    relu = nn.ReLU(inplace=True)
    x, residual = _inputs(torch.float32, "contiguous", seed=10)
    seen = []
    handle = relu.register_forward_hook(lambda module, args, out: seen.append(out.clone()))
    with torch.no_grad():
        expected = _separate(layer, x, residual)
        hooked = norm_relu(layer, relu, x, residual)
    handle.remove()
    assert len(seen) == 1 and torch.equal(seen[0], hooked) and torch.equal(hooked, expected)
    assert not any(call.get("relu") for call in kernel_calls)  # the layer alone in the kernel, the ReLU apart
    global_seen = []
    handle = nn.modules.module.register_module_forward_hook(lambda module, args, out: global_seen.append(module))
    try:
        with torch.no_grad():
            norm_relu(layer, relu, x)
    finally:
        handle.remove()
    assert global_seen == [layer, relu]


@pytest.mark.parametrize("case", ["other_activation", "relu_subclass", "bn", "residual_dtype", "residual_strides",
                                  "residual_broadcast", "kernel_off"])
def test_anything_else_takes_the_separate_operations(case, kernel_calls):
    layer = randomise(SwitchNorm2d(6), seed=11, buffers=True).eval()
    x, residual = _inputs(torch.float32, "contiguous", seed=12)
    act = nn.ReLU()
    if case == "other_activation":
        act = nn.LeakyReLU(0.1)
    elif case == "relu_subclass":
        act = type("MyReLU", (nn.ReLU,), {})()
    elif case == "bn":
        layer = nn.BatchNorm2d(6).eval()
    elif case == "residual_dtype":
        x = x.bfloat16()
        layer = layer.bfloat16()
    elif case == "residual_strides":
        residual = residual.transpose(2, 3).contiguous().transpose(2, 3)
    elif case == "residual_broadcast":
        residual = residual[:1]
    with torch.no_grad(), cpu_kernels.use_kernel(case != "kernel_off"):
        expected = act(layer(x) + residual)
        kernel_calls.clear()
        got = norm_relu(layer, act, x, residual)
    assert torch.equal(got, expected) and got.dtype == expected.dtype
    assert not any(call.get("relu") for call in kernel_calls)


def test_switchnorm_act_takes_a_plain_relu_into_the_operator(kernel_calls):
    x, _ = _inputs(torch.float32, "channels_last", seed=13)
    layer = randomise(SwitchNormAct2d(6, act=nn.ReLU(inplace=True)), seed=14, buffers=True).eval()
    with torch.no_grad():
        kernel_calls.clear()
        fused = layer(x)
        assert len(kernel_calls) == 1 and kernel_calls[0]["relu"]
        expected = torch.relu(SwitchNorm2d.forward(layer, x))
        assert torch.equal(fused, expected)
        layer.drop = nn.Dropout(0.5).eval()  # the identity in eval, but not a plain Identity: the separate calls
        kernel_calls.clear()
        assert torch.equal(layer(x), expected)
        assert not any(call.get("relu") for call in kernel_calls)


def test_fx_tracing_records_the_separate_modules():
    """A tracer that keeps SN layers as leaves (as torchvision's feature extractors can) sees the norm, the add and
    the ReLU, and the traced block computes what the block does."""

    class Tracer(torch.fx.Tracer):
        def is_leaf_module(self, module, name):
            return isinstance(module, SwitchNorm2d) or super().is_leaf_module(module, name)

    block = BasicBlockV1(6, 6, 1, None, NormFactory("sn"))
    for layer in (block.sn1, block.sn2):
        randomise(layer, seed=15, buffers=True)
    block.eval()
    graph = Tracer().trace(block)
    traced = torch.fx.GraphModule(block, graph)
    targets = [node.target for node in graph.nodes if node.op == "call_module"]
    assert targets == ["conv1", "sn1", "relu", "conv2", "sn2", "relu"]
    x, _ = _inputs(torch.float32, "contiguous", seed=16)
    with torch.no_grad():
        assert torch.equal(traced(x), block(x))


@pytest.mark.parametrize("block_type", [BasicBlockV1, BottleneckV1])
def test_resnet_blocks_end_in_one_operator_call(block_type, kernel_calls):
    """The v1 blocks call norm_relu for every norm + ReLU and for the residual sum: eval is one operator call per
    norm layer, two of them (three in the bottleneck) carrying the ReLU, the last one the shortcut."""
    block = block_type(8 * block_type.expansion, 8, 1, None, NormFactory("sn"))
    for module in block.modules():
        if isinstance(module, SwitchNorm2d):
            randomise(module, seed=17, buffers=True)
    block.eval()
    x = spread_input((2, 8 * block_type.expansion, 6, 6), torch.float32, seed=18).relu()
    with torch.no_grad():
        kernel_calls.clear()
        block(x)
    carried = [(call["relu"], call["residual"] is not None) for call in kernel_calls]
    assert carried == [(True, False)] * (1 if block_type is BasicBlockV1 else 2) + [(True, True)]


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_resnet20_on_real_images_equals_the_separate_operations(precision):
    """The shipped architecture on Fashion-MNIST test images, eval and a training step: logits and gradients with
    norm_relu equal those of the separate calls (hooks on the SN layers force them) bit for bit."""
    x, labels = fashion_mnist_batch(16)
    torch.manual_seed(0)
    model = snzoo.create_model("resnet20_sn")
    for module in model.modules():
        if isinstance(module, SwitchNorm2d):
            randomise(module, seed=19, buffers=True)
    dtype = torch.bfloat16 if precision == "bfloat16" else None

    def run(separate: bool, train: bool):
        net = copy.deepcopy(model).train(train)
        handles = [m.register_forward_hook(lambda *_: None) for m in net.modules() if isinstance(m, SwitchNorm2d)] \
            if separate else []
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None), torch.set_grad_enabled(train):
            logits = net(x)
            if train:
                nn.functional.cross_entropy(logits.float(), labels).backward()
        for handle in handles:
            handle.remove()
        return logits.detach(), [p.grad for p in net.parameters()] if train else []

    for train in (False, True):
        logits_fused, grads_fused = run(False, train)
        logits_separate, grads_separate = run(True, train)
        assert torch.equal(logits_fused, logits_separate)
        for a, b in zip(grads_fused, grads_separate):
            assert torch.equal(a, b)
