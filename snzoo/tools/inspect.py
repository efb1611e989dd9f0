"""What `snzoo inspect` reports: the importance weights of every SN layer of a zoo model or a checkpoint file."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

from torch import Tensor

from snzoo._factory import create_model
from snzoo.errors import CheckpointError, ModelConfigError
from snzoo.nn import importance_weights
from snzoo.weights import names_a_file, read_state_dict


def _flag(state_dict: Mapping[str, Tensor], key: str) -> Optional[bool]:
    value = state_dict.get(key)
    return None if value is None else bool(value.reshape(-1)[0])


def inspect_importance(target: str) -> list[dict]:
    """One row per SN layer of `target`, in module order: {"layer", "terms", "mean", "var", "mean_fixed",
    "var_fixed", "radius"}; "mean" / "var" map each term (in, ln, bn) to its probability after softmax (sparsestmax
    for Sparse SN). The fixed flags and radius are None for layers that are not Sparse SN.

    `target` is a zoo entry or architecture (its pretrained weights, through `snzoo.create_model`) or a checkpoint
    file (`snzoo.weights.read_state_dict`; a state dict does not name SwitchNorm1d's terms, see
    `snzoo.nn.importance_weights`).
    """
    if names_a_file(target):
        state_dict = read_state_dict(target)
        weights = importance_weights(state_dict)
    else:
        model = create_model(target, pretrained=True)
        state_dict = model.state_dict()
        weights = importance_weights(model)
    if not weights:
        error = CheckpointError if names_a_file(target) else ModelConfigError
        raise error(f"{target} has no SN layers (no mean_weight / var_weight importance weights)")
    rows = []
    for layer, record in weights.items():
        prefix = f"{layer}." if layer else ""
        radius = state_dict.get(prefix + "radius")
        rows.append({
            "layer": layer,
            "terms": record["terms"],
            "mean": dict(zip(record["terms"], record["mean"])),
            "var": dict(zip(record["terms"], record["var"])),
            "mean_fixed": _flag(state_dict, prefix + "mean_fixed"),
            "var_fixed": _flag(state_dict, prefix + "var_fixed"),
            "radius": None if radius is None else float(radius.reshape(-1)[0]),
        })
    return rows


def importance_table(rows: list[dict]) -> str:
    """The rows of `inspect_importance` as a text table: one line per layer, the IN / LN / BN probabilities of the
    mean and of the variance ("-" for a term the layer does not have), the fixed flags and radius of Sparse SN."""
    width = max([len("layer")] + [len(row["layer"]) for row in rows])
    labels = [f"{stat}.{term}" for stat in ("mean", "var") for term in ("in", "ln", "bn")]
    lines = [f"{'layer':<{width}}  " + " ".join(f"{label:>7}" for label in labels) + "  fixed  radius"]
    for row in rows:
        cells = [f"{row[stat][term]:7.4f}" if term in row[stat] else f"{'-':>7}"
                 for stat in ("mean", "var") for term in ("in", "ln", "bn")]
        fixed = "-" if row["mean_fixed"] is None else f"{int(row['mean_fixed'])}/{int(row['var_fixed'])}"
        radius = "-" if row["radius"] is None else f"{row['radius']:.4g}"
        lines.append(f"{row['layer']:<{width}}  " + " ".join(cells) + f"  {fixed:>5}  {radius:>6}")
    return "\n".join(lines)


__all__ = ["importance_table", "inspect_importance"]
