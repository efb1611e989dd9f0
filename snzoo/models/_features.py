"""Backbone use of the classifiers: stage descriptions, intermediate feature maps and the features-only network.

A model describes its trunk as stages of top-level module names (stage 0 is the stem); the stages run in order
and each stage's output is one feature map. `FeatureInfo` says the channels, reduction and module of each,
with the interface of timm's FeatureInfo so detection and segmentation code written for timm reads it as is.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Union

from torch import Tensor, nn

Indices = Optional[Union[int, Sequence[int]]]


class FeatureInfo:
    """Channels (`num_chs`), reduction (input size / map size) and module name of each stage, and the selected
    stages (`out_indices`). channels() / reduction() / module_name() / get_dicts() list the selected stages in
    out_indices order; an idx argument (int or list) picks stages by their own index instead, as timm's does.
    """

    def __init__(self, info: Sequence[Mapping[str, Any]], out_indices: Sequence[int]) -> None:
        self.info = [dict(stage, index=i) for i, stage in enumerate(info)]
        self.out_indices = tuple(take_indices(len(self.info), list(out_indices)))

    def from_other(self, out_indices: Sequence[int]) -> FeatureInfo:
        """The same stages with another selection."""
        return FeatureInfo(self.info, out_indices)

    def get(self, key: str, idx: Optional[Union[int, Sequence[int]]] = None) -> Any:
        """One key of the selected stages (idx None), of the stages in idx (a list), or of stage idx (an int)."""
        if idx is None:
            return [self.info[i][key] for i in self.out_indices]
        if isinstance(idx, (tuple, list)):
            return [self.info[i][key] for i in idx]
        return self.info[idx][key]

    def get_dicts(self, keys: Optional[Sequence[str]] = None, idx: Optional[Union[int, Sequence[int]]] = None):
        """The stage dicts (or only their `keys`), selected as in get()."""
        def pick(stage: dict) -> dict:
            return dict(stage) if keys is None else {k: stage[k] for k in keys}

        if idx is None:
            return [pick(self.info[i]) for i in self.out_indices]
        if isinstance(idx, (tuple, list)):
            return [pick(self.info[i]) for i in idx]
        return pick(self.info[idx])

    def channels(self, idx: Optional[Union[int, Sequence[int]]] = None) -> Any:
        """Feature channels of the selected stages."""
        return self.get("num_chs", idx)

    def reduction(self, idx: Optional[Union[int, Sequence[int]]] = None) -> Any:
        """Input size over feature map size of the selected stages."""
        return self.get("reduction", idx)

    def module_name(self, idx: Optional[Union[int, Sequence[int]]] = None) -> Any:
        """Name of the module whose output (for v2's last stage: followed by the ReLU) is the stage's map."""
        return self.get("module", idx)

    def __getitem__(self, item: int) -> dict:
        return self.info[item]

    def __len__(self) -> int:
        return len(self.info)

    def __iter__(self):
        return iter(self.info)

    def __repr__(self) -> str:
        return f"FeatureInfo(out_indices={self.out_indices}, info={self.info})"


def take_indices(num_stages: int, indices: Indices = None) -> list[int]:
    """Stage indices from timm's forms: None = all, an int n = the last n, a list = those (negative from the end)."""
    if indices is None:
        return list(range(num_stages))
    if isinstance(indices, int):
        if not 0 < indices <= num_stages:
            raise ValueError(f"indices={indices} asks for the last {indices} of {num_stages} stages")
        return list(range(num_stages - indices, num_stages))
    taken = [i if i >= 0 else num_stages + i for i in indices]
    bad = [given for given, i in zip(indices, taken) if not 0 <= i < num_stages]
    if bad or not taken:
        raise ValueError(f"stage indices must lie in 0..{num_stages - 1} (or -{num_stages}..-1), got {list(indices)}")
    return taken


def run_stages(
    modules: Mapping[str, nn.Module], stages: Sequence[Sequence[str]], x: Tensor, take: Sequence[int]
) -> tuple[Tensor, list[Tensor]]:
    """Run the stages in order; the output of the last one and the outputs of the stages in `take` (in that
    order, a stage asked for twice given twice)."""
    outputs: dict[int, Tensor] = {}
    wanted = set(take)
    for index, names in enumerate(stages):
        for name in names:
            x = modules[name](x)
        if index in wanted:
            outputs[index] = x
    return x, [outputs[i] for i in take]


class FeatureListNet(nn.Module):
    """A classifier's trunk up to its last selected stage; forward returns the selected stages' feature maps.

    The modules keep their names in the classifier (conv1, sn1, layer1, ...), so the state dict is the
    classifier's without the head and the stages it does not run.
    """

    def __init__(self, model: nn.Module, out_indices: Indices = None) -> None:
        super().__init__()
        stages = model.feature_stages
        take = take_indices(len(stages), out_indices)
        self.feature_stages = tuple(stages[: max(take) + 1])
        for names in self.feature_stages:
            for name in names:
                self.add_module(name, model.get_submodule(name))
        self.out_indices = tuple(take)
        self.feature_info = model.feature_info.from_other(take)
        for attribute in ("architecture", "pretrained_cfg", "norm_config", "depth", "version", "norm", "first_conv"):
            if hasattr(model, attribute):
                setattr(self, attribute, getattr(model, attribute))

    def forward(self, x: Tensor) -> list[Tensor]:
        return run_stages(self._modules, self.feature_stages, x, self.out_indices)[1]
