"""Figures of SN models and training runs: importance weights per layer, and the curves of a run's log.

Drawing uses matplotlib's Agg canvas directly (no pyplot, no display), so it works on headless machines
and leaves any interactive backend of the caller alone. Every PNG is written to a temporary file and
renamed into place, so a crash never leaves a half-written figure.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Optional


from snzoo._factory import create_model
from snzoo._io import PathLike, atomic_path
from snzoo.errors import PlotError
from snzoo.nn.importance import importance_weights
from snzoo.train.run_log import read_metrics
from snzoo.models import check_finite
from snzoo.weights import CHECKPOINT_SUFFIXES, MODEL_FOLDER_PREFIXES, names_a_file, read_state_dict

TERMS = ("in", "ln", "bn")
TERM_LABELS = {"in": "IN", "ln": "LN", "bn": "BN"}
# One fixed colour per term in every figure, so figures of different models compare at a glance.
TERM_COLORS = {"in": "#1f77b4", "ln": "#2ca02c", "bn": "#d62728"}


# ----------------------------------------------------------------------------------------------------------
# Importance weights


def short_layer_name(name: str) -> str:
    """A compact axis label: "layer3.5.sn2" -> "L3.5.sn2", "layer2.0.downsample.1" -> "L2.0.ds"."""
    name = re.sub(r"^layer(\d+)", r"L\1", name)
    name = re.sub(r"downsample(\.\d+)?$", "ds", name)
    return name or "(model)"


# ----------------------------------------------------------------------------------------------------------
# Drawing


def _new_figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotError("plotting needs matplotlib: pip install matplotlib") from None
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, out_png: PathLike) -> Path:
    """Write the figure as PNG through a temporary file in the same folder, then rename it into place."""
    out_png = Path(out_png)
    if out_png.is_dir():
        raise PlotError(f"{out_png} is a folder; give the path of the PNG file to write")
    with atomic_path(out_png) as tmp, open(tmp, "xb") as f:
        fig.savefig(f, format="png")
    return out_png


def plot_importance(weights: Mapping[str, dict], out_png: PathLike, title: str = "importance weights") -> Path:
    """Draw the IN / LN / BN shares of every SN layer as stacked bars, mean and variance weights side by side.

    weights: as `importance_weights` returns (or the "layers" of an importance log line). Layers run top
    to bottom in module order. Returns the written path.
    """
    if not weights:
        raise PlotError("no SN layers to plot (no importance weights found)")
    names = list(weights)
    present = [t for t in TERMS if any(t in w["terms"] for w in weights.values())]
    n = len(names)
    fig = _new_figure(10.0, 1.4 + 0.2 * n)
    axes = fig.subplots(1, 2, sharey=True)
    rows = list(range(n))
    for ax, stat, heading in zip(axes, ("mean", "var"), ("mean weights", "variance weights")):
        left = [0.0] * n
        for term in present:
            shares = [_share(weights[name], stat, term) for name in names]
            ax.barh(rows, shares, left=left, height=0.8, color=TERM_COLORS[term], label=TERM_LABELS[term],
                    edgecolor="none")
            left = [a + b for a, b in zip(left, shares)]
        ax.set_xlim(0, 1)
        ax.set_ylim(n - 0.5, -0.5)  # first layer at the top
        ax.set_title(heading)
        ax.set_xlabel("share")
    axes[0].set_yticks(rows, [short_layer_name(name) for name in names], fontsize=7 if n > 30 else 8)
    axes[1].tick_params(axis="y", left=False)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(present), frameon=False)
    fig.suptitle(title)
    return _save(fig, out_png)


def _share(layer: Mapping, stat: str, term: str) -> float:
    terms = list(layer["terms"])
    return float(layer[stat][terms.index(term)]) if term in terms else 0.0


def _line_figure(series: list[dict], xlabel: str, ylabel: str, title: str, out_png: Path) -> Path:
    fig = _new_figure(8.0, 4.5)
    ax = fig.subplots()
    for s in series:
        ax.plot(s["x"], s["y"], label=s["label"], **s.get("style", {}))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if len(series) > 1:
        ax.legend()
    return _save(fig, out_png)


# ----------------------------------------------------------------------------------------------------------
# Runs and checkpoints


def smooth(values: list[float], weight: float) -> list[float]:
    """Exponential moving average with TensorBoard's start-up correction (the first values are not pulled to 0)."""
    out, average, norm = [], 0.0, 0.0
    for v in values:
        average = weight * average + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out.append(average / norm)
    return out


def _points(records: list[dict], key: str, x_key: str = "step") -> tuple[list, list]:
    pairs = sorted(
        (r[x_key], r[key]) for r in records
        if isinstance(r.get(key), (int, float)) and isinstance(r.get(x_key), (int, float)) and math.isfinite(r[key])
    )
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _per_epoch(records: list[dict], key: str) -> tuple[list, list]:
    """The last value of `key` logged in each epoch (end-of-epoch summaries, or a running average's final value)."""
    last = {}
    for r in records:
        if isinstance(r.get(key), (int, float)) and isinstance(r.get("epoch"), int) and math.isfinite(r[key]):
            last[r["epoch"]] = r[key]
    epochs = sorted(last)
    return epochs, [last[e] for e in epochs]


def last_importance(records: list[dict]) -> Optional[dict]:
    """The last "importance" record of a run's log ({"step", "layers", ...}), or None when it has none."""
    found = [r for r in records if r.get("split") == "importance" and isinstance(r.get("layers"), dict)]
    return found[-1] if found else None


# The metrics a run validates with, by task, and their axis labels.
VALIDATION_METRICS = {"top1": "top-1", "box_AP": "box AP", "mask_AP": "mask AP", "miou": "mIoU"}


def plot_run(run_dir: PathLike, out_dir: Optional[PathLike] = None) -> list[Path]:
    """Draw the curves of a run's metrics.jsonl into out_dir (default run_dir/plots); returns the files written.

    loss.png: training loss per logged step with a smoothed line (and validation loss where logged);
    top1.png (box_AP.png, mask_AP.png, miou.png for detection and segmentation runs): the validation metric per
    epoch for every split that logs it (per step when no epoch is logged);
    lr.png: the learning rate per step; importance.png: the last importance record, when there is one.
    """
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "plots"
    name = run_dir.resolve().name
    written = []

    train = [r for r in records if r.get("split") == "train"]
    steps, losses = _points(train, "loss")
    if steps:
        # The smoothing window grows with the run, so long runs get a readable trend and short ones stay sharp.
        window = max(5, len(losses) // 40)
        series = [
            {"x": steps, "y": losses, "label": "train loss", "style": {"color": "#1f77b4", "alpha": 0.3, "linewidth": 0.8}},
            {"x": steps, "y": smooth(losses, 1 - 1 / window), "label": f"smoothed (EMA over ~{window} points)",
             "style": {"color": "#1f77b4", "linewidth": 1.8}},
        ]
        val_steps, val_losses = _points([r for r in records if r.get("split") == "val"], "loss")
        if val_steps:
            series.append({"x": val_steps, "y": val_losses, "label": "val loss",
                           "style": {"color": "#ff7f0e", "marker": "o", "linestyle": "-"}})
        written.append(_line_figure(series, "step", "loss", f"{name}: training loss", out_dir / "loss.png"))

    for key, label in VALIDATION_METRICS.items():
        series = []
        for split in dict.fromkeys(r.get("split") for r in records):
            if split == "importance":
                continue
            rows = [r for r in records if r.get("split") == split]
            x, y = _per_epoch(rows, key)
            if not x:
                x, y = _points(rows, key)
            if x:
                series.append({"x": x, "y": y, "label": f"{split} {label}", "style": {"marker": "o", "markersize": 3}})
        if series:
            per_epoch = any(isinstance(r.get("epoch"), int) and key in r for r in records)
            written.append(_line_figure(series, "epoch" if per_epoch else "step", label, f"{name}: {label}",
                                        out_dir / f"{key}.png"))

    lr_steps, lrs = _points([r for r in records if r.get("split") != "importance"], "lr")
    if lr_steps:
        written.append(_line_figure([{"x": lr_steps, "y": lrs, "label": "lr", "style": {"color": "#9467bd"}}],
                                    "step", "learning rate", f"{name}: learning rate", out_dir / "lr.png"))

    importance = last_importance(records)
    if importance is not None and importance.get("layers"):
        written.append(plot_importance(importance["layers"], out_dir / "importance.png",
                                       f"{name}: importance weights at step {importance['step']}"))
    if not written:
        raise PlotError(f"{run_dir} logs no loss, validation metric, lr or importance weights; nothing to plot")
    return written


def checkpoint_importance(name_or_path: PathLike) -> dict[str, dict]:
    """The importance weights of a checkpoint file, or of a zoo entry's pretrained weights.

    A path that exists is read as a checkpoint (`read_state_dict`); a name is loaded through
    `snzoo.create_model(name, pretrained=True)` (an architecture means its default entry).
    """
    target = str(name_or_path)
    path = Path(target)
    if not names_a_file(target):
        weights, source = importance_weights(create_model(target, pretrained=True)), target
    elif path.is_file():
        state_dict = read_state_dict(path)
        check_finite(state_dict, str(path))  # NaN weights would draw as an empty chart, not as an error
        weights, source = importance_weights(state_dict), str(path)
    elif path.exists():
        raise PlotError(f"{path} is a directory without metrics.jsonl, not a run directory or a checkpoint file")
    else:
        raise PlotError(f"{path} does not exist; pass a run directory, a checkpoint file or a zoo entry name")
    if not weights:
        raise PlotError(f"{source} has no SN layers (no mean_weight / var_weight); nothing to plot")
    return weights


def default_importance_png(name_or_path: PathLike) -> Path:
    """`<name>-importance.png` in the current directory, <name> being the entry name or the file's stem."""
    target = str(name_or_path)
    path = Path(target)
    if not target.startswith(MODEL_FOLDER_PREFIXES) and path.is_file():
        while path.suffix in CHECKPOINT_SUFFIXES:
            path = path.with_suffix("")
        stem = path.name
    else:
        stem = target
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "model"
    return Path.cwd() / f"{stem}-importance.png"


def plot_checkpoint(name_or_path: PathLike, out_png: Optional[PathLike] = None, title: Optional[str] = None) -> dict:
    """Draw the importance weights of a zoo entry or checkpoint file into out_png.

    out_png defaults to `default_importance_png(name_or_path)`. Returns the weights drawn
    ({layer: {"terms", "mean", "var"}}).
    """
    weights = checkpoint_importance(name_or_path)
    out_png = Path(out_png) if out_png is not None else default_importance_png(name_or_path)
    plot_importance(weights, out_png, title or f"{Path(str(name_or_path)).name}: importance weights")
    return weights


__all__ = ["TERMS", "TERM_COLORS", "TERM_LABELS", "checkpoint_importance", "default_importance_png", "last_importance", "plot_checkpoint", "plot_importance", "plot_run", "short_layer_name", "smooth"]
