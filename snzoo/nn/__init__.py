"""Switchable Normalization layers, checkpoint-compatible with the original release."""

from snzoo.nn.batch_average import batch_average_layers, finalize_batch_average
from snzoo.nn.convert import PRESERVE_SHARE, convert_to_switchnorm
from snzoo.nn.freeze import (
    FrozenSparseSwitchNorm2d,
    FrozenSwitchNorm1d,
    FrozenSwitchNorm2d,
    FrozenSwitchNorm3d,
    FrozenSwitchNormAct2d,
    freeze_switchnorm,
    set_norm_eval,
)
from snzoo.nn.importance import importance_weights
from snzoo.nn.norm_act import SwitchNormAct2d, norm_relu
from snzoo.nn.sparse_switchnorm import SparseSwitchNorm2d
from snzoo.nn.sparsestmax import sparsemax, sparsestmax
from snzoo.nn.switchnorm import SwitchNorm1d, SwitchNorm2d, SwitchNorm3d, SyncSwitchNorm2d
from snzoo.nn.utils import (
    convert_sync_switchnorm,
    drop_bn_branch,
    reopen_sparse_switchnorm,
    set_ghost_batch_size,
    set_sparsestmax_radius,
    switchnorm_layers,
)

__all__ = [
    "SwitchNorm1d",
    "SwitchNorm2d",
    "SwitchNorm3d",
    "SyncSwitchNorm2d",
    "SparseSwitchNorm2d",
    "sparsemax",
    "sparsestmax",
    "finalize_batch_average",
    "batch_average_layers",
    "set_ghost_batch_size",
    "convert_sync_switchnorm",
    "set_sparsestmax_radius",
    "switchnorm_layers",
    "drop_bn_branch",
    "importance_weights",
    "SwitchNormAct2d",
    "norm_relu",
    "convert_to_switchnorm",
    "PRESERVE_SHARE",
    "freeze_switchnorm",
    "set_norm_eval",
    "FrozenSwitchNorm1d",
    "FrozenSwitchNorm2d",
    "FrozenSwitchNorm3d",
    "FrozenSparseSwitchNorm2d",
    "FrozenSwitchNormAct2d",
    "reopen_sparse_switchnorm",
]
