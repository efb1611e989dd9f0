"""The zoo as tables: the README's Markdown table of every entry."""

from __future__ import annotations

from typing import Any, Mapping

from snzoo.zoo._lookups import manifest as current_manifest
from snzoo.zoo._manifest import Manifest
from snzoo.zoo.entry import Entry, Metrics


def _schedule_words(recipe: Mapping[str, Any]) -> str:
    sched = recipe["schedule"]
    warm = f"warmup {sched['warmup_epochs']} + " if sched.get("warmup_epochs") else ""
    if sched["type"] == "step":
        return f"{recipe['epochs']}, {warm}step {'/'.join(str(m) for m in sched['milestones'])}"
    return f"{recipe['epochs']}, {warm}{sched['type']}"


def _checksum_kind(entry: Entry) -> str:
    if any(s.sha256 for s in entry.sources):
        return "sha256"
    if any(s.md5 for s in entry.sources):
        return "md5"
    return "none"


def zoo_table_markdown(manifest: Manifest | None = None) -> str:
    """The zoo as a Markdown table, one row per entry in manifest order (the README's table)."""
    m = manifest if manifest is not None else current_manifest()

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    rows = ["| Entry | Architecture | Batch | Top-1 | Top-5 | Epochs, schedule | Checksum |",
            "|---|---|---|---:|---:|---|---|"]
    for entry in m.entries.values():
        metrics = entry.metrics.get(entry.eval.dataset) or next(iter(entry.metrics.values()), Metrics(None, None))
        batch = entry.recipe["batch"]
        name = f"`{entry.name}`" + (" (default)" if entry.default else "")
        rows.append(f"| {name} | {entry.architecture} | {batch['devices']}x{batch['per_device']} | "
                    f"{pct(metrics.top1)} | {pct(metrics.top5)} | {_schedule_words(entry.recipe)} | "
                    f"{_checksum_kind(entry)} |")
    return "\n".join(rows) + "\n"

