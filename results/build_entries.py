"""Turn finished `snzoo train` runs into shipped zoo entries, and write the batch-size grid and its picture.

    .venv/bin/python results/build_entries.py RUN_DIR... [--subset 2000]

For every run directory (each holds ARCH.TAG.safetensors and entry.json from `snzoo train`):
- copies the weights into snzoo/pretrained/ and rewrites the entry's source as a `package:` file, pinned;
- measures the metrics with `snzoo eval` on the full Fashion-MNIST test set and on its first N images (the
  subset the test suite re-measures), and records both;
- merges the entry into weights_manifest.json (replacing an entry of the same name);
- copies the run's metrics log to results/logs/.
Runs of the same entry with other seeds (`--name` ending in `_seedK` is not used; pass them with --spread) only
contribute to the run-to-run spread in results/grid.csv.
Then writes results/grid.csv and results/grid.png (top-1 against per-device batch, a line per norm) from every
entry trained here (the manifest's `package:` entries; with no RUN_DIR it only redraws them), and
results/importance.png (the learned IN / LN / BN weights of the default SN entry).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRETRAINED = REPO / "snzoo" / "pretrained"
MANIFEST = REPO / "weights_manifest.json"
SNZOO = [sys.executable, "-m", "snzoo"]


def measure(name: str, limit: int | None) -> dict:
    """`snzoo eval NAME --data fashion-mnist --json` (the same path users run)."""
    command = SNZOO + ["eval", name, "--data", "fashion-mnist", "--json", "-j", "0", "--quiet"]
    if limit:
        command += ["--limit", str(limit)]
    out = subprocess.run(command, capture_output=True, text=True, check=True, cwd=REPO)
    return json.loads(out.stdout)


def install(run_dir: Path, subset: int) -> tuple[str, dict]:
    (name, entry), = json.loads((run_dir / "entry.json").read_text())["entries"].items()
    PRETRAINED.mkdir(exist_ok=True)
    weights = PRETRAINED / f"{name}.safetensors"
    shutil.copyfile(run_dir / f"{name}.safetensors", weights)
    source = entry["sources"][0]
    source.update(url=f"package:pretrained/{weights.name}", kind="package", file_name=weights.name)
    entry["notes"] = [
        f"Trained by snzoo itself: `snzoo train {name.split('.')[0]} --recipe RECIPE --batch "
        f"{entry['recipe']['batch']['devices']}x{entry['recipe']['batch']['per_device']} --data fashion-mnist` "
        "with the recipe below; the weights ship inside the package.",
        f"metrics: the full Fashion-MNIST test set (10,000 images); eval_subset: its first {subset} images, "
        "which the test suite re-measures.",
    ]
    entry["default"] = False
    manifest = json.loads(MANIFEST.read_text())
    manifest["entries"][name] = entry
    MANIFEST.write_text(json.dumps(manifest, indent=2) + "\n")
    logs = REPO / "results" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run_dir / "metrics.jsonl", logs / f"{name}.metrics.jsonl")
    return name, entry


def set_defaults(names: list[str], chosen: dict[str, str]) -> dict[str, str]:
    """Mark the chosen entries as their architecture's default; an architecture that has no default yet gets
    its first new entry. Returns the default of every architecture touched."""
    manifest = json.loads(MANIFEST.read_text())
    entries = manifest["entries"]
    defaults = {}
    for name in names:
        arch = name.split(".")[0]
        current = next((n for n, e in entries.items() if n.split(".")[0] == arch and e.get("default")), None)
        defaults[arch] = chosen.get(arch) or current or name
    for name, entry in entries.items():
        arch = name.split(".")[0]
        if arch in defaults:
            entry["default"] = defaults[arch] == name
    MANIFEST.write_text(json.dumps(manifest, indent=2) + "\n")
    return defaults


def record_metrics(name: str, full: dict, part: dict, subset: int) -> None:
    manifest = json.loads(MANIFEST.read_text())
    entry = manifest["entries"][name]
    entry["metrics"] = {
        "fashion-mnist-test": {"top1": round(full["top1"], 2), "top5": round(full["top5"], 2)},
        f"fashion-mnist-test-first{subset}": {"top1": round(part["top1"], 2), "top5": round(part["top5"], 2)},
    }
    MANIFEST.write_text(json.dumps(manifest, indent=2) + "\n")


def shipped_rows() -> list[dict]:
    """One grid row per entry trained here (a `package:` source, Fashion-MNIST metrics), from the manifest; the
    run-to-run spread of earlier grids is kept."""
    grid = REPO / "results" / "grid.csv"
    earlier = {r["entry"]: r for r in csv.DictReader(grid.open())} if grid.exists() else {}
    rows = []
    for name, entry in json.loads(MANIFEST.read_text())["entries"].items():
        full = entry.get("metrics", {}).get("fashion-mnist-test")
        if entry["sources"][0]["kind"] != "package" or full is None:
            continue
        batch = entry["recipe"]["batch"]
        old = earlier.get(name, {})
        rows.append({"entry": name, "norm": entry["norm"]["type"], "devices": batch["devices"],
                     "per_device": batch["per_device"], "top1": full["top1"], "top5": full["top5"],
                     "seeds": int(old.get("seeds") or 1), "top1_spread": old.get("top1_spread", "")})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", type=Path)
    parser.add_argument("--spread", nargs="*", type=Path, default=[], help="Extra-seed runs of an entry.")
    parser.add_argument("--subset", type=int, default=2000)
    parser.add_argument("--default", action="append", default=[], help="ARCH.TAG to mark as its architecture's default.")
    args = parser.parse_args()
    names = [install(run, args.subset)[0] for run in args.runs]
    defaults = set_defaults(names, {d.split(".")[0]: d for d in args.default})
    for name in names:
        record_metrics(name, measure(name, None), measure(name, args.subset), args.subset)
    rows = shipped_rows()
    for run in args.spread:
        summary = json.loads((run / "summary.json").read_text())
        seed = json.loads((run / "recipe.json").read_text())["run"]["seed"]
        (entry_name,) = json.loads((run / "entry.json").read_text())["entries"]
        row = next(r for r in rows if r["entry"] == entry_name)
        other = round(summary["val"]["top1"], 2)
        row.update(seeds=row["seeds"] + 1, top1_spread=f"seed 0: {row['top1']:.2f}, seed {seed}: {other:.2f} "
                   f"(difference {abs(other - row['top1']):.2f})")
    write_grid(rows)
    write_importance(defaults)


def write_grid(rows: list[dict]) -> None:
    out = REPO / "results" / "grid.csv"
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda r: (r["norm"], -r["per_device"])))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
    # A collapsed run (BN at one image per device) would flatten every other line: keep the axis on the rest and
    # point at it from the bottom edge.
    values = [float(r["top1"]) for r in rows]
    kept = [v for v in values if v >= statistics.median(values) - 10]
    low, high = min(kept) - 0.6, max(kept) + 0.4
    ax.set_ylim(low, high)
    for norm, color in (("bn", "#d62728"), ("gn", "#2ca02c"), ("sn", "#1f77b4")):
        points = sorted((r["per_device"], float(r["top1"])) for r in rows if r["norm"] == norm)
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", color=color, label=norm.upper())
        for per_device, top1 in points:
            if top1 < low:
                ax.annotate(f"{norm.upper()}: {top1:.2f}", xy=(per_device, low), xytext=(per_device * 1.15, low + 0.5),
                            color=color, arrowprops=dict(arrowstyle="->", color=color))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("images per device (batch as devices x per-device)")
    ax.set_ylabel("Fashion-MNIST test top-1 (%)")
    ax.set_title("resnet20 on Fashion-MNIST: top-1 against per-device batch")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(REPO / "results" / "grid.png")


def write_importance(defaults: dict[str, str]) -> None:
    from snzoo.plot import plot_checkpoint

    sn = defaults.get("resnet20_sn")
    if sn:
        plot_checkpoint(sn, REPO / "results" / "importance.png", title=f"{sn}: learned importance weights")


if __name__ == "__main__":
    main()
