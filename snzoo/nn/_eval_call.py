"""An SN layer in eval mode without gradients, on the CPU kernel: one operator call behind a few cheap checks.

Under torch.no_grad / inference_mode an SN layer in eval mode is a fixed function of its input. Its general path
(importance weights, the choice of implementation, the kernel's conditions) costs as much Python as the kernel's
operator takes time on small maps (resnet20's 28x28 at batch 8), and more inside a model, where that Python runs
cold between convolutions. So what the operator takes is found once per layer and reused while the layer holds the
same tensor objects and the inputs of its importance weights are at the same versions (an optimizer step, a load
or a `fill_` bumps them).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from snzoo.nn import cpu_kernels, fused
from snzoo.nn import functional as F_sn

_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


class _KernelArgs:
    """The operator's arguments for one layer, and what they were derived from."""

    __slots__ = ("entries", "tensors", "slots", "running", "using_bn")

    def __init__(self, layer) -> None:
        entries = []
        for name in layer.kernel_inputs:
            where = "_parameters" if name in layer._parameters else "_buffers"
            tensor = getattr(layer, where).get(name)
            # Only the importance weights are derived (softmax / sparsestmax): the operator reads the others live.
            # An inference tensor keeps no version counter, so weights derived from one are not reused.
            derived = name in layer.importance_inputs
            if tensor is None and (layer.using_bn or name not in _OPTIONAL):
                raise _NotReusable  # computed (a parametrization) or missing: the general path finds it
            if derived and tensor.is_inference():
                raise _NotReusable
            entries.append((where, name, tensor, tensor._version if derived else None))
        self.entries = tuple(entries)
        mean_probs, var_probs = layer.importance_weights()
        found = {name: tensor for _, name, tensor, _ in entries}
        running = (found.get("running_mean"), found.get("running_var")) if layer.using_bn else (None, None)
        self.tensors = (found["weight"], found["bias"], mean_probs, var_probs)
        self.slots = cpu_kernels.term_slots(layer.terms)
        self.running = running
        self.using_bn = layer.using_bn

    def current(self, layer) -> bool:
        """True while `layer` holds the same tensors, its importance-weight inputs at the same versions."""
        if layer.using_bn is not self.using_bn:
            return False
        held = layer.__dict__
        for where, name, tensor, version in self.entries:
            now = held[where].get(name)
            if now is not tensor or (version is not None and now._version != version):
                return False
        return True


class _NotReusable(Exception):
    pass


_OPTIONAL = ("running_mean", "running_var")  # absent without a BN term


def kernel_eval(layer, x: Tensor, relu: bool = False, residual: Optional[Tensor] = None) -> Optional[Tensor]:
    """layer(x) for an SN layer in eval mode with gradients off, as one call of the CPU kernel's operator (with relu:
    relu(layer(x) + residual), the residual in x's layout and dtype); None where that does not apply (another device,
    dtype or layout, an empty batch or single values, the kernel or the fused implementation switched off, tracing,
    exporting or compiling): the layer's general path runs then."""
    # first: under a tracer, even reading x's shape would enter the graph
    if fused._exporting() or torch.compiler.is_compiling():
        return None
    if not (x.is_cpu and x.dtype in cpu_kernels.DTYPES):
        return None
    dims = x.dim()
    if dims not in layer.input_dims or dims < 3:
        return None
    n, c = x.shape[0], x.shape[1]
    if n == 0 or c != layer.num_features or x.numel() < 2 * n * c:
        return None
    if not (x.is_contiguous() or (dims in _CHANNELS_LAST and x.is_contiguous(memory_format=_CHANNELS_LAST[dims]))):
        return None
    if F_sn.get_implementation() != "fused" or not cpu_kernels.active():
        return None
    args = layer.__dict__.get("_kernel_args")
    if args is None or not args.current(layer):
        try:
            args = _KernelArgs(layer)
        except _NotReusable:
            return None
        layer.__dict__["_kernel_args"] = args
    weight, bias, mean_probs, var_probs = args.tensors
    running_mean, running_var = args.running
    return cpu_kernels.switch_norm(x, weight, bias, mean_probs, var_probs, args.slots, n, running_mean, running_var,
                                   False, layer.momentum, layer.using_moving_average, layer.eps, relu=relu,
                                   residual=residual)
