"""A zoo entry: one published checkpoint, as typed data read from the weights manifest."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Mapping

from torch import Tensor

from snzoo.models import check_state_dict


@dataclass(frozen=True)
class Source:
    """One place a checkpoint can be fetched from, with what is known to verify it."""

    url: str
    kind: str
    format: str
    file_name: str
    sha256: str | None = None
    md5: str | None = None
    size: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON form, as in the manifest."""
        return {"url": self.url, "kind": self.kind, "format": self.format, "file_name": self.file_name,
                "sha256": self.sha256, "md5": self.md5, "size": self.size}


@dataclass(frozen=True)
class NormConfig:
    """The normalization layer a checkpoint was trained with, and its constructor arguments."""

    type: str
    using_bn: bool
    using_moving_average: bool
    momentum: float
    last_gamma: bool

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NormConfig:
        """From its JSON form (a manifest entry's or a model folder's `norm`, already validated)."""
        return cls(type=data["type"], using_bn=data["using_bn"], using_moving_average=data["using_moving_average"],
                   momentum=float(data["momentum"]), last_gamma=data["last_gamma"])

    def model_kwargs(self) -> dict[str, Any]:
        """The norm's keyword arguments for an architecture's builder."""
        return {"using_bn": self.using_bn, "using_moving_average": self.using_moving_average,
                "momentum": self.momentum, "last_gamma": self.last_gamma}

    def to_dict(self) -> dict[str, Any]:
        """The JSON form, as in the manifest."""
        return {"type": self.type, "using_bn": self.using_bn, "using_moving_average": self.using_moving_average,
                "momentum": self.momentum, "last_gamma": self.last_gamma}


@dataclass(frozen=True)
class Metrics:
    """Published accuracy in percent; None where it was not published."""

    top1: float | None
    top5: float | None

    def to_dict(self) -> dict[str, Any]:
        """The JSON form, as in the manifest."""
        return {"top1": self.top1, "top5": self.top5}


@dataclass(frozen=True)
class EvalConfig:
    """The 1-crop evaluation the published metrics were measured with."""

    dataset: str
    resize: int
    crop: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def crop_pct(self) -> float:
        """The centre-crop fraction (crop / resize), e.g. 0.875 for 224 out of 256."""
        return self.crop / self.resize

    def to_dict(self) -> dict[str, Any]:
        """The JSON form, as in the manifest."""
        return {"dataset": self.dataset, "resize": self.resize, "crop": self.crop,
                "interpolation": self.interpolation, "mean": list(self.mean), "std": list(self.std)}


@dataclass(frozen=True)
class Entry:
    """One published checkpoint: what to build, where to get it, how it scores and how it was trained."""

    name: str
    architecture: str
    tag: str
    default: bool
    norm: NormConfig
    num_classes: int
    sources: tuple[Source, ...]
    metrics: dict[str, Metrics]
    eval: EvalConfig
    recipe: dict[str, Any]
    provenance: dict[str, Any]
    notes: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, name: str, data: Mapping[str, Any]) -> Entry:
        """Build an entry from its manifest JSON (already validated)."""
        arch, _, tag = name.partition(".")
        ev = data["eval"]
        return cls(
            name=name,
            architecture=data["architecture"],
            tag=tag,
            default=bool(data["default"]),
            norm=NormConfig.from_dict(data["norm"]),
            # JSON Schema counts 1000.0 as an integer; builders want a real int.
            num_classes=int(data["num_classes"]),
            sources=tuple(Source(url=s["url"], kind=s["kind"], format=s["format"], file_name=s["file_name"],
                                 sha256=s["sha256"], md5=s["md5"],
                                 size=None if s["size"] is None else int(s["size"]))
                          for s in data["sources"]),
            metrics={k: Metrics(top1=v["top1"], top5=v["top5"]) for k, v in data["metrics"].items()},
            eval=EvalConfig(dataset=ev["dataset"], resize=int(ev["resize"]), crop=int(ev["crop"]),
                            interpolation=ev["interpolation"], mean=tuple(ev["mean"]), std=tuple(ev["std"])),
            recipe=copy.deepcopy(dict(data["recipe"])),
            provenance=copy.deepcopy(dict(data["provenance"])),
            notes=tuple(data.get("notes", ())),
        )

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for the architecture's builder that reproduce the trained model."""
        return {"num_classes": self.num_classes, **self.norm.model_kwargs()}

    def check_state_dict(self, state_dict: Mapping[str, Tensor], what: str) -> None:
        """Raise CheckpointError (one line naming `what`) unless the state dict loads into this entry's model."""
        check_state_dict(state_dict, self.architecture, what, **self.model_kwargs())

    def learning_rate(self) -> float:
        """The recipe's peak learning rate: base * devices * per_device / reference_batch."""
        batch, lr = self.recipe["batch"], self.recipe["lr"]
        return lr["base"] * batch["devices"] * batch["per_device"] / lr["reference_batch"]

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: the manifest entry plus its "name"."""
        return {
            "name": self.name,
            "architecture": self.architecture,
            "default": self.default,
            "norm": self.norm.to_dict(),
            "num_classes": self.num_classes,
            "sources": [s.to_dict() for s in self.sources],
            "metrics": {k: m.to_dict() for k, m in self.metrics.items()},
            "eval": self.eval.to_dict(),
            "recipe": copy.deepcopy(self.recipe),
            "provenance": copy.deepcopy(self.provenance),
            "notes": list(self.notes),
        }
