"""Switchable Normalization layers with the parameter names, shapes and init of the released checkpoints."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from snzoo.nn import cpu_kernels
from snzoo.nn import functional as F_sn
from snzoo.nn._eval_call import kernel_eval
from snzoo.nn._checks import check_sync_or_ghost, ghost_group_size, resolve_process_group


def _reusable_outside_autograd(*parameters: Tensor) -> bool:
    """True when values computed from `parameters` may be reused from an earlier call: no gradient must reach the
    parameters, their version counters tell when they change (inference tensors keep none), and no tracer or compiler
    is recording the computation (a reused value would enter its graph as a constant)."""
    if torch.is_grad_enabled() and any(p.requires_grad for p in parameters):
        return False
    if any(p.is_inference() for p in parameters):
        return False
    return not (torch.jit.is_tracing() or torch.compiler.is_compiling())


class _SwitchNorm(nn.Module):
    """Shared state of the SwitchNorm layers.

    Attributes set after construction:
    - ghost_batch_size: BN statistics over groups of this many samples (emulates per-device statistics).
    - process_group: synchronise the BN statistics over this torch.distributed group (SyncSwitchNorm2d).
    - norm_eval: stay in eval mode through model.train() (snzoo.nn.set_norm_eval).
    """

    input_dims: tuple[int, ...] = ()
    param_dims: int = 4  # weight / bias shape (1, C, 1, 1)
    norm_eval: bool = False  # snzoo.nn.set_norm_eval; a class default, so layers unpickled from older code have it
    # What the kernel's operator reads (by name), and which of those the importance weights derive from.
    kernel_inputs: tuple[str, ...] = ("weight", "bias", "mean_weight", "var_weight", "running_mean", "running_var")
    importance_inputs: tuple[str, ...] = ("mean_weight", "var_weight")
    softmax_importance = True  # importance_weights() is the softmax of the raw weights (Sparse SN: sparsestmax)

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.997,
        using_moving_average: bool = True,
        using_bn: bool = True,
        last_gamma: bool = False,
        *,
        device: Optional[torch.device | str] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}  # as torch's norm layers: frameworks build on a device
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.using_moving_average = using_moving_average
        self.using_bn = using_bn
        self.last_gamma = last_gamma
        self.ghost_batch_size: Optional[int] = None
        self.process_group: Optional[object] = None
        shape = (1, num_features) + (1,) * (self.param_dims - 2)
        self.weight = nn.Parameter(torch.ones(shape, **factory))
        self.bias = nn.Parameter(torch.zeros(shape, **factory))
        num_terms = len(self.terms)  # 3 (IN, LN, BN), 2 without BN, 2 (LN, BN) for SwitchNorm1d
        self.mean_weight = nn.Parameter(torch.ones(num_terms, **factory))
        self.var_weight = nn.Parameter(torch.ones(num_terms, **factory))
        if using_bn:
            self.register_buffer("running_mean", torch.zeros(self.buffer_shape(), **factory))
            self.register_buffer("running_var", torch.zeros(self.buffer_shape(), **factory))
        self.reset_parameters()

    def buffer_shape(self) -> tuple[int, ...]:
        return (1, self.num_features, 1)

    def reset_parameters(self) -> None:
        """Initialise as the original: gamma 1 (0 with last_gamma), beta 0, raw importance weights 1."""
        nn.init.constant_(self.weight, 0.0 if self.last_gamma else 1.0)
        nn.init.zeros_(self.bias)
        nn.init.ones_(self.mean_weight)
        nn.init.ones_(self.var_weight)
        self.reset_running_stats()

    def reset_running_stats(self) -> None:
        """Zero the running buffers (the variance too, as the original)."""
        if self.using_bn:
            self.running_mean.zero_()
            self.running_var.zero_()

    @property
    def terms(self) -> tuple[str, ...]:
        return F_sn.TERMS_SN if self.using_bn else F_sn.TERMS_SN_NO_BN

    def train(self, mode: bool = True) -> "_SwitchNorm":
        """As nn.Module.train, except that a layer in norm_eval mode stays in eval mode itself (its submodules,
        such as an activation's dropout, follow `mode`)."""
        super().train(mode)
        if self.norm_eval:
            self.training = False
        return self

    def importance_weights(self) -> tuple[Tensor, Tensor]:
        """The mixing weights of the mean and variance statistics, ordered as `terms`."""
        raw_mean, raw_var = self._tensor("mean_weight"), self._tensor("var_weight")
        if not _reusable_outside_autograd(raw_mean, raw_var):
            return torch.softmax(raw_mean, 0), torch.softmax(raw_var, 0)
        # Without a gradient to carry the weights change only when the raw parameters do (an optimizer step or a
        # load bumps their version): two softmax calls cost as much as a small layer's normalisation, so the last
        # result is reused.
        key = (raw_mean.data_ptr(), raw_mean._version, raw_mean.dtype, raw_var.data_ptr(), raw_var._version)
        cached = self.__dict__.get("_probs_cache")
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = self.__dict__["_probs_cache"] = (key, (torch.softmax(raw_mean, 0), torch.softmax(raw_var, 0)))
        return cached[1]

    def _tensor(self, name: str) -> Tensor:
        """A parameter or buffer by a dict lookup (nn.Module's attribute fallback costs more, on every call); by
        attribute where it is something else (a parametrization)."""
        found = self._parameters.get(name)
        if found is None:
            found = self._buffers.get(name)
        return found if found is not None else getattr(self, name)

    def _sync_group(self) -> Optional[object]:
        if self.process_group is None or not self.training:
            return None
        check_sync_or_ghost(self.process_group, self.ghost_batch_size)
        if not (dist.is_available() and dist.is_initialized()):
            return None
        group = resolve_process_group(self.process_group)
        return group if dist.get_world_size(group) > 1 else None

    def _check_input(self, x: Tensor) -> None:
        if x.dim() not in self.input_dims:
            dims = " or ".join(f"{d}-D" for d in self.input_dims)
            raise ValueError(f"{type(self).__name__} expects a {dims} input, got a {x.dim()}-D tensor of shape {tuple(x.shape)}")
        if x.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__}({self.num_features}) got {x.shape[1]} channels in input of shape {tuple(x.shape)}"
            )

    def _apply(self, fn, recurse=True):
        # .to(dtype) and the like keep the parameters' objects and version counters (only buffers are replaced): the
        # arguments derived from them must go.
        self.__dict__.pop("_kernel_args", None)
        return super()._apply(fn, recurse)

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training or torch.is_grad_enabled()):
            y = kernel_eval(self, x)
            if y is not None:
                return y
        self._check_input(x)
        group = self._sync_group()
        if x.shape[0] == 0 and (group is None or not self.training):
            # An empty batch (a detector's mask head when nothing was detected): as torch's norm layers, an empty
            # output still tied to the affine parameters, and no statistics to take or update.
            shape = (1, self.num_features) + (1,) * (x.dim() - 2)
            return x * self.weight.reshape(shape) + self.bias.reshape(shape)
        if group is None and F_sn.takes_whole_layer(x):
            # What F_sn.switch_norm would run, without its dispatch: on small maps the Python around the one
            # operator call costs as much as the call itself.
            return self._whole_layer(x)
        mean_probs, var_probs = self.importance_weights()
        return F_sn.switch_norm(
            x,
            self.weight,
            self.bias,
            mean_probs,
            var_probs,
            self.running_mean.view(1, self.num_features, 1) if self.using_bn else None,
            self.running_var.view(1, self.num_features, 1) if self.using_bn else None,
            terms=self.terms,
            training=self.training,
            momentum=self.momentum,
            eps=self.eps,
            using_moving_average=self.using_moving_average,
            ghost_batch_size=self.ghost_batch_size,
            process_group=group,
        )

    def _relu_forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Optional[Tensor]:
        """relu(self(x) + residual) as one operator call of the CPU kernel, which adds and clamps in its output pass,
        where the layer's call is one operator call; else None (then the separate operations). A residual must have
        x's shape, strides and dtype."""
        if not (self.training or torch.is_grad_enabled()):
            return kernel_eval(self, x, relu=True, residual=residual)
        if x.dim() not in self.input_dims or x.shape[0] == 0 or x.shape[1] != self.num_features:
            return None
        if self._sync_group() is None and F_sn.takes_whole_layer(x):
            return self._whole_layer(x, relu=True, residual=residual)
        return None

    def _whole_layer(self, x: Tensor, relu: bool = False, residual: Optional[Tensor] = None) -> Tensor:
        """The layer as one operator of the CPU kernel (the running buffers are read as C values, any shape)."""
        if self.softmax_importance:  # the raw weights: the operator takes their softmax and returns their gradient
            mean_probs, var_probs, logits = self._tensor("mean_weight"), self._tensor("var_weight"), True
        else:
            (mean_probs, var_probs), logits = self.importance_weights(), False
        n = x.shape[0]
        if self.using_bn:
            bn_group = ghost_group_size(n, self.ghost_batch_size) if self.training else n
            running_mean, running_var = self._tensor("running_mean"), self._tensor("running_var")
        else:
            bn_group, running_mean, running_var = n, None, None
        return cpu_kernels.switch_norm(
            x, self._tensor("weight"), self._tensor("bias"), mean_probs, var_probs, cpu_kernels.term_slots(self.terms),
            bn_group, running_mean, running_var, self.training, self.momentum, self.using_moving_average, self.eps,
            logits, relu=relu, residual=residual,
        )

    def extra_repr(self) -> str:
        text = (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"using_moving_average={self.using_moving_average}, using_bn={self.using_bn}, last_gamma={self.last_gamma}"
        )
        if self.ghost_batch_size:
            text += f", ghost_batch_size={self.ghost_batch_size}"
        return text


class SwitchNorm2d(_SwitchNorm):
    """Switchable Normalization over (N, C, H, W): a learned mix of IN, LN and BN statistics.

    momentum weighs the OLD running value (0.9 here equals PyTorch BatchNorm's momentum=0.1); the released
    2018 checkpoints were trained with 0.997. With using_bn=False only IN and LN are mixed and there are no
    running buffers. With using_moving_average=False the running buffers accumulate batch statistics and
    `snzoo.nn.finalize_batch_average` turns them into averages.
    """

    input_dims = (4,)

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.9,
        using_moving_average: bool = True,
        using_bn: bool = True,
        last_gamma: bool = False,
        *,
        device: Optional[torch.device | str] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, using_moving_average, using_bn, last_gamma,
                         device=device, dtype=dtype)


class SwitchNorm3d(_SwitchNorm):
    """Switchable Normalization over (N, C, D, H, W); statistics as SwitchNorm2d with L = D*H*W."""

    input_dims = (5,)
    param_dims = 5


class SyncSwitchNorm2d(SwitchNorm2d):
    """SwitchNorm2d whose BN statistics (mean and E[x^2]) are all-reduced over a torch.distributed group.

    Falls back to local statistics when torch.distributed is not initialised or the group has one rank.
    """

    def __init__(self, num_features: int, *args, process_group: Optional[object] = None, **kwargs) -> None:
        super().__init__(num_features, *args, **kwargs)
        self.process_group = True if process_group is None else process_group


class SwitchNorm1d(_SwitchNorm):
    """Switchable Normalization of (N, C) or (N, C, L) input, mixing LN and BN (no IN term).

    (N, C): LN uses the mean and unbiased variance over C of each sample, BN the same over N (the original).
    (N, C, L): L is treated like H*W in SwitchNorm2d (statistics built from per-(sample, channel) statistics
    over L), without the IN term. weight, bias and running buffers have shape (1, C).
    Synchronised (a process_group, see convert_sync_switchnorm), BN's N is the samples of every rank: for
    (N, C) the mean and unbiased variance over all of them, for (N, C, L) as in SyncSwitchNorm2d.
    """

    input_dims = (2, 3)
    param_dims = 2

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.997,
        using_moving_average: bool = True,
        *,
        device: Optional[torch.device | str] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, using_moving_average, using_bn=True, last_gamma=False,
                         device=device, dtype=dtype)

    def buffer_shape(self) -> tuple[int, ...]:
        return (1, self.num_features)

    @property
    def terms(self) -> tuple[str, ...]:
        return F_sn.TERMS_SN1D

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 3:
            return super().forward(x)
        self._check_input(x)
        group = self._sync_group()
        mean_probs, var_probs = self.importance_weights()
        if group is not None:
            return self._synchronised_flat_forward(x, mean_probs, var_probs, group)
        return F_sn.switch_norm_flat(
            x,
            self.weight,
            self.bias,
            mean_probs,
            var_probs,
            self.running_mean,
            self.running_var,
            training=self.training,
            momentum=self.momentum,
            eps=self.eps,
            using_moving_average=self.using_moving_average,
            ghost_batch_size=self.ghost_batch_size,
        )

    def _synchronised_flat_forward(self, x: Tensor, mean_probs: Tensor, var_probs: Tensor, group: object) -> Tensor:
        """Training forward on (N, C) input with BN statistics over the samples of every rank in `group`."""
        c = x.shape[1]
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        var_ln, mean_ln = torch.var_mean(xf, dim=1, keepdim=True, correction=1 if c > 1 else 0)
        mean_bn, var_bn = _synchronised_flat_batch_stats(xf, group)
        F_sn.update_running_stats(
            self.running_mean, self.running_var, mean_bn, var_bn, self.momentum, self.using_moving_average
        )
        mean = mean_probs[0] * mean_ln + mean_probs[1] * mean_bn
        var = var_probs[0] * var_ln + var_probs[1] * var_bn
        y = (xf - mean) / (var + self.eps).sqrt() * self.weight + self.bias
        return y.to(x.dtype)


def _synchronised_flat_batch_stats(x: Tensor, group: object) -> tuple[Tensor, Tensor]:
    """Per-channel mean and unbiased variance, shapes (1, C), of (N, C) x over the samples of every rank.

    Two all-reduces: the sums and sample count give the mean, then the sums of squared deviations from it give
    the variance without the cancellation of E[x^2] - mean^2 (these layers often see features far from zero).
    Both are differentiable, so the gradients are those of one process holding the whole batch.
    """
    from torch.distributed.nn.functional import all_reduce  # differentiable: its backward all-reduces too

    n, c = x.shape
    totals = all_reduce(torch.cat([x.sum(0), x.new_full((1,), float(n))]), op=dist.ReduceOp.SUM, group=group)
    count = float(totals[-1])
    mean = (totals[:c] / count).reshape(1, c)
    squared_deviations = all_reduce((x - mean).pow(2).sum(0), op=dist.ReduceOp.SUM, group=group)
    var = (squared_deviations / (count - 1 if count > 1 else count)).reshape(1, c)
    return mean, var
