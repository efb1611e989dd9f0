"""GhostBatchNorm2d (the BN baseline under device emulation) against separate torch BatchNorm2d per ghost batch."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from snzoo.nn.ghost_batchnorm import GhostBatchNorm2d


def _pair(c: int = 3):
    torch.manual_seed(0)
    ghost = GhostBatchNorm2d(c, momentum=0.3).double()
    with torch.no_grad():
        ghost.weight.uniform_(0.5, 1.5)
        ghost.bias.normal_()
        ghost.running_mean.normal_()
        ghost.running_var.uniform_(0.5, 1.5)
    plain = nn.BatchNorm2d(c, momentum=0.3).double()
    plain.load_state_dict(ghost.state_dict())
    return ghost, plain


@pytest.mark.parametrize("k", [1, 2, 4])
def test_ghost_batches_equal_one_batchnorm_per_group(k):
    ghost, plain = _pair()
    ghost.ghost_batch_size = k
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(8, 3, 5, 4, generator=g, dtype=torch.float64) * 2 + 1).requires_grad_(True)
    upstream = torch.randn(x.shape, generator=g, dtype=torch.float64)
    y = ghost(x)
    y.backward(upstream)

    copies = [copy.deepcopy(plain) for _ in range(8 // k)]
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = torch.cat([bn(chunk) for bn, chunk in zip(copies, x_ref.split(k))])
    y_ref.backward(upstream)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-10)
    # the parameters are shared by every group: their gradients add up
    torch.testing.assert_close(ghost.weight.grad, sum(bn.weight.grad for bn in copies), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ghost.bias.grad, sum(bn.bias.grad for bn in copies), rtol=1e-10, atol=1e-10)
    # the running statistics are what the per-device buffers average to
    for name in ("running_mean", "running_var"):
        expected = torch.stack([getattr(bn, name) for bn in copies]).mean(0)
        torch.testing.assert_close(getattr(ghost, name), expected, rtol=1e-10, atol=1e-10, msg=name)
    assert int(ghost.num_batches_tracked) == 1


def test_without_ghost_batches_or_in_eval_it_is_batchnorm():
    ghost, plain = _pair()
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    torch.testing.assert_close(ghost(x), plain(x), rtol=0, atol=0)
    ghost.ghost_batch_size = 2
    ghost.eval(), plain.eval()
    torch.testing.assert_close(ghost(x), plain(x), rtol=0, atol=0)


def test_ghost_batch_not_dividing_raises():
    ghost, _ = _pair()
    ghost.ghost_batch_size = 3
    with pytest.raises(ValueError, match="ghost batches of 3"):
        ghost(torch.randn(4, 3, 2, 2, dtype=torch.float64))
