"""SyncSwitchNorm2d, synchronised SwitchNorm1d on (N, C) and convert_sync_switchnorm with two real gloo processes,
against one process on the full batch (and the float64 NumPy reference for SwitchNorm1d).

One spawn runs every distributed scenario (starting processes is the slow part); each rank saves its results to
a file and the tests below compare them with single-process computations.
"""

from __future__ import annotations

import copy
import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch import nn

from snzoo.nn import SwitchNorm1d, SwitchNorm2d, SyncSwitchNorm2d, convert_sync_switchnorm, set_ghost_batch_size
from snzoo.nn import functional as F_sn

from spawn_testing import spawn_and_wait

try:  # tests/ as a package or as a plain directory on sys.path
    from . import reference_sn as ref_sn
except ImportError:
    import reference_sn as ref_sn

WORLD = 2
SPLIT = (4, 4)
UNEVEN = (3, 5)
STEPS = 2
TOL = dict(rtol=1e-10, atol=1e-10)
SPAWN_TIMEOUT_S = 120

pytestmark = [
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"),
    pytest.mark.timeout(SPAWN_TIMEOUT_S + 60),
]


# ---------------------------------------------------------------------------------------- shared set-up
def _data():
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64).reshape(1, 3, 1, 1)
    xs = [torch.randn(8, 3, 4, 4, generator=g, dtype=torch.float64) * scale + i for i in range(STEPS)]
    targets = [torch.randn(8, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(STEPS)]
    return xs, targets


def _randomise(layer, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (layer.weight, layer.bias, layer.mean_weight, layer.var_weight):
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
        layer.weight.add_(1.0)
    return layer


def _sync_layer():
    return _randomise(SyncSwitchNorm2d(3, momentum=0.8).double(), seed=1)


def _model(norm=SwitchNorm2d):
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        norm(4, momentum=0.7, using_moving_average=False),
        nn.ReLU(),
        nn.Conv2d(4, 3, 1),
        norm(3, momentum=0.7),
    ).double()
    _randomise(model[1], seed=3)
    _randomise(model[4], seed=4)
    return model


def _flat_data():
    """(N, C) features far from zero, with channels of different scales, for SwitchNorm1d."""
    g = torch.Generator().manual_seed(5)
    scale = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    xs = [torch.randn(8, 3, generator=g, dtype=torch.float64) * scale + 3.0 * (i + 1) for i in range(STEPS)]
    targets = [torch.randn(8, 3, generator=g, dtype=torch.float64) for _ in range(STEPS)]
    return xs, targets


def _flat_layer():
    return _randomise(SwitchNorm1d(3, momentum=0.8).double(), seed=6)


def _flat_model():
    torch.manual_seed(7)
    model = nn.Sequential(
        nn.Linear(3, 4),
        SwitchNorm1d(4, momentum=0.7, using_moving_average=False),
        nn.ReLU(),
        nn.Linear(4, 3),
        SwitchNorm1d(3, momentum=0.7),
    ).double()
    _randomise(model[1], seed=8)
    _randomise(model[4], seed=9)
    return model


def _chunks(x, sizes):
    return list(x.split(list(sizes)))


def _train_steps(module, inputs, targets, allreduce_grads=False):
    """Forward/backward `STEPS` times; returns per step (output, input grad, param grads) and final buffers."""
    steps = []
    for x, t in zip(inputs, targets):
        module.zero_grad(set_to_none=True)
        x = x.clone().requires_grad_(True)
        y = module(x)
        (y * t).sum().backward()
        grads = {}
        for name, p in module.named_parameters():
            g = p.grad.clone()
            if allreduce_grads:
                dist.all_reduce(g)
            grads[name] = g
        steps.append(
            {"y": y.detach(), "x_grad": x.grad.clone(), "grads": grads, "grad_fn": type(y.grad_fn).__name__}
        )
    buffers = {name: b.clone() for name, b in module.named_buffers()}
    return steps, buffers


# --------------------------------------------------------------------------------------------- the worker
def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    if os.path.isdir("/sys/class/net/lo"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
    )
    try:
        xs, targets = _data()
        results = {}

        def local(tensors, sizes):
            return [_chunks(t, sizes)[rank] for t in tensors]

        # SyncSwitchNorm2d, even split, train then eval; with each implementation of switch_norm
        for impl in F_sn.IMPLEMENTATIONS:
            with F_sn.use_implementation(impl):
                layer = _sync_layer()
                results[f"sync_{impl}"] = _train_steps(
                    layer, local(xs, SPLIT), local(targets, SPLIT), allreduce_grads=True
                )
                layer.eval()
                with torch.no_grad():
                    results[f"sync_eval_{impl}"] = layer(local(xs, SPLIT)[0])

        # SyncSwitchNorm2d, uneven split
        layer = _sync_layer()
        results["sync_uneven"] = _train_steps(layer, local(xs, UNEVEN), local(targets, UNEVEN), allreduce_grads=True)

        # a small model converted with convert_sync_switchnorm (batch-average and moving-average layers)
        model = convert_sync_switchnorm(_model())
        results["converted"] = _train_steps(model, local(xs, SPLIT), local(targets, SPLIT), allreduce_grads=True)

        # SwitchNorm1d on (N, C), synchronised: even and uneven splits, then eval; and a converted model
        flat_xs, flat_targets = _flat_data()
        for name, sizes in (("flat", SPLIT), ("flat_uneven", UNEVEN)):
            layer = convert_sync_switchnorm(_flat_layer())
            results[f"sync_{name}"] = _train_steps(
                layer, local(flat_xs, sizes), local(flat_targets, sizes), allreduce_grads=True
            )
        layer.eval()
        with torch.no_grad():
            results["sync_flat_eval"] = layer(local(flat_xs, UNEVEN)[0])
        model = convert_sync_switchnorm(_flat_model())
        results["converted_flat"] = _train_steps(
            model, local(flat_xs, SPLIT), local(flat_targets, SPLIT), allreduce_grads=True
        )

        # plain SwitchNorm2d: statistics stay per rank
        plain = _randomise(SwitchNorm2d(3, momentum=0.8).double(), seed=1)
        results["plain"] = _train_steps(plain, local(xs, SPLIT), local(targets, SPLIT))

        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sync")
    spawn_and_wait(_worker, (str(tmp / "init"), str(tmp)), WORLD, SPAWN_TIMEOUT_S, "gloo")
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _full_batch_reference(module):
    xs, targets = _data()
    return _train_steps(module, xs, targets)


def _compare_sync(rank_results, ref_results, sizes):
    ref_steps, ref_buffers = ref_results
    for step, ref_step in enumerate(ref_steps):
        y = torch.cat([r[0][step]["y"] for r in rank_results])
        x_grad = torch.cat([r[0][step]["x_grad"] for r in rank_results])
        assert [r[0][step]["y"].shape[0] for r in rank_results] == list(sizes)
        torch.testing.assert_close(y, ref_step["y"], **TOL)
        torch.testing.assert_close(x_grad, ref_step["x_grad"], **TOL)
        for r in rank_results:
            assert set(r[0][step]["grads"]) == set(ref_step["grads"])
            for name, g in ref_step["grads"].items():
                torch.testing.assert_close(r[0][step]["grads"][name], g, **TOL, msg=lambda m: f"{name}: {m}")
    for r in rank_results:
        assert set(r[1]) == set(ref_buffers)
        for name, b in ref_buffers.items():
            torch.testing.assert_close(r[1][name], b, **TOL, msg=lambda m: f"{name}: {m}")


# -------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("impl", F_sn.IMPLEMENTATIONS)
def test_sync_switchnorm_equals_full_batch(ranks, impl):
    reference = _full_batch_reference(_randomise(SwitchNorm2d(3, momentum=0.8).double(), 1))
    _compare_sync([r[f"sync_{impl}"] for r in ranks], reference, SPLIT)


def test_fused_sync_switchnorm_runs_the_fused_function(ranks):
    """Synchronised statistics do not fall back to the reference formulas (and their memory) in the fused path."""
    for r in ranks:
        assert {step["grad_fn"] for step in r["sync_fused"][0]} == {"_SwitchNormFunctionBackward"}
        assert {step["grad_fn"] for step in r["sync_reference"][0]} != {"_SwitchNormFunctionBackward"}


def test_sync_switchnorm_uneven_split_equals_full_batch(ranks):
    _compare_sync(
        [r["sync_uneven"] for r in ranks], _full_batch_reference(_randomise(SwitchNorm2d(3, momentum=0.8).double(), 1)), UNEVEN
    )


@pytest.mark.parametrize("impl", F_sn.IMPLEMENTATIONS)
def test_sync_switchnorm_eval_is_per_sample(ranks, impl):
    ref = _randomise(SwitchNorm2d(3, momentum=0.8).double(), 1)
    xs, targets = _data()
    _train_steps(ref, xs, targets)
    ref.eval()
    with torch.no_grad():
        expected = ref(xs[0])
    torch.testing.assert_close(torch.cat([r[f"sync_eval_{impl}"] for r in ranks]), expected, **TOL)


def test_convert_sync_switchnorm_model_equals_full_batch(ranks):
    _compare_sync([r["converted"] for r in ranks], _full_batch_reference(_model()), SPLIT)


def test_plain_switchnorm_keeps_per_rank_statistics(ranks):
    ghost = _randomise(SwitchNorm2d(3, momentum=0.8).double(), 1)
    set_ghost_batch_size(ghost, SPLIT[0])
    ref_steps, ref_buffers = _full_batch_reference(ghost)
    whole_steps, _ = _full_batch_reference(_randomise(SwitchNorm2d(3, momentum=0.8).double(), 1))
    for step, ref_step in enumerate(ref_steps):
        y = torch.cat([r["plain"][0][step]["y"] for r in ranks])
        torch.testing.assert_close(y, ref_step["y"], **TOL)
        torch.testing.assert_close(torch.cat([r["plain"][0][step]["x_grad"] for r in ranks]), ref_step["x_grad"], **TOL)
        assert not torch.allclose(y, whole_steps[step]["y"])  # per-rank statistics really differ from full-batch ones
    for name in ("running_mean", "running_var"):
        per_rank = [r["plain"][1][name] for r in ranks]
        assert not torch.allclose(per_rank[0], per_rank[1])
        torch.testing.assert_close(torch.stack(per_rank).mean(0), ref_buffers[name], **TOL)


def _flat_numpy_reference(layer, xs):
    """Outputs per step and final buffers of the float64 NumPy SwitchNorm1d on each whole (N, C) batch."""
    params = {name: p.detach().numpy() for name, p in layer.named_parameters()}
    rm, rv = layer.running_mean.numpy().copy(), layer.running_var.numpy().copy()
    outputs = []
    for x in xs:
        y, rm, rv = ref_sn.switch_norm_1d_flat(
            x.numpy(), params["weight"], params["bias"], params["mean_weight"], params["var_weight"], rm, rv,
            training=True, momentum=layer.momentum, eps=layer.eps, using_moving_average=layer.using_moving_average,
        )
        outputs.append(torch.from_numpy(y))
    return outputs, torch.from_numpy(rm), torch.from_numpy(rv)


@pytest.mark.parametrize("name, sizes", [("flat", SPLIT), ("flat_uneven", UNEVEN)])
def test_sync_switchnorm1d_on_flat_input_equals_the_full_batch_reference(ranks, name, sizes):
    flat_xs, flat_targets = _flat_data()
    rank_results = [r[f"sync_{name}"] for r in ranks]
    outputs, running_mean, running_var = _flat_numpy_reference(_flat_layer(), flat_xs)
    for step, expected in enumerate(outputs):
        torch.testing.assert_close(torch.cat([r[0][step]["y"] for r in rank_results]), expected, **TOL)
    for r in rank_results:
        torch.testing.assert_close(r[1]["running_mean"], running_mean, **TOL)
        torch.testing.assert_close(r[1]["running_var"], running_var, **TOL)
    # Gradients (and everything again): one process holding the whole batch.
    _compare_sync(rank_results, _full_batch_reference_flat(_flat_layer()), sizes)
    # Per-rank statistics would give other outputs: the comparison above can tell them apart.
    local_layer = _flat_layer()
    first_rank_alone = local_layer(flat_xs[0][: sizes[0]]).detach()
    assert not torch.allclose(first_rank_alone, outputs[0][: sizes[0]], rtol=1e-3, atol=1e-3)


def _full_batch_reference_flat(module):
    flat_xs, flat_targets = _flat_data()
    return _train_steps(module, flat_xs, flat_targets)


def test_sync_switchnorm1d_on_flat_input_evaluates_with_its_running_statistics(ranks):
    flat_xs, flat_targets = _flat_data()
    layer = _flat_layer()
    _train_steps(layer, flat_xs, flat_targets)
    layer.eval()
    with torch.no_grad():
        expected = layer(flat_xs[0])
    torch.testing.assert_close(torch.cat([r["sync_flat_eval"] for r in ranks]), expected, **TOL)


def test_convert_sync_switchnorm_flat_model_equals_full_batch(ranks):
    _compare_sync([r["converted_flat"] for r in ranks], _full_batch_reference_flat(_flat_model()), SPLIT)


# ------------------------------------------------------------------------------------- single process only
def test_sync_switchnorm_without_distributed_is_local():
    assert not dist.is_initialized()
    sync, plain = _sync_layer(), _randomise(SwitchNorm2d(3, momentum=0.8).double(), seed=1)
    assert list(sync.state_dict()) == list(plain.state_dict())
    xs, targets = _data()
    a, b = _train_steps(sync, xs, targets), _train_steps(plain, xs, targets)
    for sa, sb in zip(a[0], b[0]):
        torch.testing.assert_close(sa["y"], sb["y"], rtol=0, atol=0)
    torch.testing.assert_close(a[1]["running_var"], b[1]["running_var"], rtol=0, atol=0)


def test_convert_sync_switchnorm_flags():
    model = _model()
    assert convert_sync_switchnorm(model) is model
    assert model[1].process_group is True and model[4].process_group is True
    ghosted = _model()
    set_ghost_batch_size(ghosted, 2)
    with pytest.raises(ValueError, match="ghost"):
        convert_sync_switchnorm(ghosted)
    # state_dict keys are those of the unconverted model
    assert list(convert_sync_switchnorm(copy.deepcopy(_model())).state_dict()) == list(_model().state_dict())
