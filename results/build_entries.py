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
Then writes results/grid.csv, results/grid.png (top-1 against per-device batch, a line per norm) and
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


def set_defaults(names: list[str], defaults: dict[str, str]) -> None:
    manifest = json.loads(MANIFEST.read_text())
    for name in names:
        arch = name.split(".")[0]
        manifest["entries"][name]["default"] = defaults.get(arch) == name
    MANIFEST.write_text(json.dumps(manifest, indent=2) + "\n")


def record_metrics(name: str, full: dict, part: dict, subset: int) -> None:
    manifest = json.loads(MANIFEST.read_text())
    entry = manifest["entries"][name]
    entry["metrics"] = {
        "fashion-mnist-test": {"top1": round(full["top1"], 2), "top5": round(full["top5"], 2)},
        f"fashion-mnist-test-first{subset}": {"top1": round(part["top1"], 2), "top5": round(part["top5"], 2)},
    }
    MANIFEST.write_text(json.dumps(manifest, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--spread", nargs="*", type=Path, default=[], help="Extra-seed runs of an entry.")
    parser.add_argument("--subset", type=int, default=2000)
    parser.add_argument("--default", action="append", default=[], help="ARCH.TAG to mark as its architecture's default.")
    args = parser.parse_args()
    names = [install(run, args.subset)[0] for run in args.runs]
    defaults = {d.split(".")[0]: d for d in args.default}
    for name in names:  # an architecture without a chosen default gets its first entry
        defaults.setdefault(name.split(".")[0], name)
    set_defaults(names, defaults)
    rows = []
    for name in names:
        full, part = measure(name, None), measure(name, args.subset)
        record_metrics(name, full, part, args.subset)
        entry = json.loads(MANIFEST.read_text())["entries"][name]
        batch = entry["recipe"]["batch"]
        rows.append({"entry": name, "norm": entry["norm"]["type"], "devices": batch["devices"],
                     "per_device": batch["per_device"], "top1": round(full["top1"], 2), "top5": round(full["top5"], 2),
                     "seeds": 1, "top1_spread": ""})
    for run in args.spread:
        summary = json.loads((run / "summary.json").read_text())
        seed = json.loads((run / "recipe.json").read_text())["run"]["seed"]
        name = json.loads((run / "entry.json").read_text())["entries"]
        (entry_name,) = name
        row = next(r for r in rows if r["entry"] == entry_name)
        values = [row["top1"], round(summary["val"]["top1"], 2)]
        row.update(seeds=row["seeds"] + 1, top1_spread=f"{min(values):.2f}-{max(values):.2f} (seed {seed}: {values[1]:.2f}, "
                   f"stdev {statistics.stdev(values):.2f})")
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
    for norm, color in (("bn", "#d62728"), ("gn", "#2ca02c"), ("sn", "#1f77b4")):
        points = sorted((r["per_device"], r["top1"]) for r in rows if r["norm"] == norm)
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", color=color, label=norm.upper())
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
