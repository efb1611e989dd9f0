"""Freezing SN layers for fine-tuning (detection backbones): fully frozen layers, and frozen statistics only.

- `freeze_switchnorm`: every SN layer becomes its Frozen* class (FrozenSwitchNorm2d...), as torchvision's
  FrozenBatchNorm2d is to BatchNorm2d: parameters held as buffers (no gradient, not in `parameters()`), always
  the eval formulation (running statistics for the BN term, IN and LN per sample), no buffer updates, whatever
  `model.train()` says. Its state dict has the same keys and shapes as the layer it replaces, so checkpoints load
  into either. (`snzoo.nn.FrozenSwitchNorm` is something else: the layer folded into constants for export.)
- `set_norm_eval`: the SN layers stay in eval mode through `model.train()` (running statistics for the BN term,
  no updates) while their importance weights and affine parameters still train, like mmdet's `norm_eval`. The
  SN detection release trained its frozen stages this way (kept in eval mode).
"""

from __future__ import annotations

from torch import nn

from snzoo.nn._replace import replace_modules
from snzoo.nn.norm_act import SwitchNormAct2d
from snzoo.nn.sparse_switchnorm import SparseSwitchNorm2d
from snzoo.nn.switchnorm import SwitchNorm1d, SwitchNorm2d, SwitchNorm3d, _SwitchNorm


class _FrozenLayer:
    """Mixin of the frozen classes: parameters turned into buffers, eval mode for good (`norm_eval`)."""

    norm_eval = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._parameters_to_buffers()
        self.train(False)

    @classmethod
    def from_layer(cls, layer: _SwitchNorm) -> "_FrozenLayer":
        """The frozen version of `layer`, sharing its tensors and submodules (`layer` itself is not changed)."""
        frozen = cls.__new__(cls)
        for key, value in layer.__dict__.items():
            if key in ("_probs_cache", "_eval_weights", "_kernel_args", "norm_eval"):
                continue
            frozen.__dict__[key] = type(value)(value) if isinstance(value, (dict, set)) else value
        frozen._parameters_to_buffers()
        return frozen.train(False)

    def _parameters_to_buffers(self) -> None:
        # Parameters first, so the state dict lists its keys in the order of the unfrozen layer.
        buffers = {name: p.detach() for name, p in self._parameters.items() if p is not None}
        buffers.update(self._buffers)
        self._parameters = type(self._parameters)()
        self._buffers = type(self._buffers)(buffers)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", frozen"


class FrozenSwitchNorm1d(_FrozenLayer, SwitchNorm1d):
    """SwitchNorm1d frozen (see `freeze_switchnorm`)."""


class FrozenSwitchNorm2d(_FrozenLayer, SwitchNorm2d):
    """SwitchNorm2d (or SyncSwitchNorm2d) frozen (see `freeze_switchnorm`)."""


class FrozenSwitchNorm3d(_FrozenLayer, SwitchNorm3d):
    """SwitchNorm3d frozen (see `freeze_switchnorm`)."""


class FrozenSparseSwitchNorm2d(_FrozenLayer, SparseSwitchNorm2d):
    """SparseSwitchNorm2d frozen: sparsestmax at the stored radius, or the fixed one-hot (see `freeze_switchnorm`)."""


class FrozenSwitchNormAct2d(_FrozenLayer, SwitchNormAct2d):
    """SwitchNormAct2d frozen; its dropout and activation follow `model.train()` (see `freeze_switchnorm`)."""


# Most specific first: the frozen class of an SN layer is the first entry it is an instance of.
_FROZEN_CLASSES = (
    (SparseSwitchNorm2d, FrozenSparseSwitchNorm2d),
    (SwitchNormAct2d, FrozenSwitchNormAct2d),
    (SwitchNorm1d, FrozenSwitchNorm1d),
    (SwitchNorm3d, FrozenSwitchNorm3d),
    (SwitchNorm2d, FrozenSwitchNorm2d),
)


def _frozen(module: nn.Module):
    if not isinstance(module, _SwitchNorm) or isinstance(module, _FrozenLayer):
        return None
    for cls, frozen_cls in _FROZEN_CLASSES:
        if isinstance(module, cls):
            return frozen_cls.from_layer(module)
    raise TypeError(f"no frozen class for {type(module).__name__}")


def freeze_switchnorm(module: nn.Module) -> nn.Module:
    """Replace every SN layer of `module` by its frozen class, in place; returns `module` (the frozen layer when
    `module` is one). Frozen layers compute the eval formulation in train mode too, update no buffer and have no
    parameters; their state dicts are those of the layers they replace."""
    return replace_modules(module, _frozen)


def set_norm_eval(module: nn.Module, enabled: bool = True) -> int:
    """Keep every SN layer of `module` in eval mode through `module.train()` (True), or let it follow again (False).

    In that mode the BN term uses the running statistics and they are not updated, while the importance weights and
    the affine parameters still get gradients (IN and LN are per-sample statistics anyway); Sparse SN layers do not
    fix one-hot weights then. The SN detection release kept its frozen stages in eval mode the same way.
    Frozen layers (`freeze_switchnorm`) stay in eval mode either way. Returns the number of layers set.
    """
    layers = [m for m in module.modules() if isinstance(m, _SwitchNorm) and not isinstance(m, _FrozenLayer)]
    for layer in layers:
        layer.norm_eval = enabled
        layer.train(module.training)
    return len(layers)


__all__ = [
    "FrozenSparseSwitchNorm2d", "FrozenSwitchNorm1d", "FrozenSwitchNorm2d", "FrozenSwitchNorm3d",
    "FrozenSwitchNormAct2d", "freeze_switchnorm", "set_norm_eval",
]
