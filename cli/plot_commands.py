"""`snzoo plot`: a thin wrapper over snzoo.tools.plot."""

from __future__ import annotations

from pathlib import Path

import click

from snzoo.tools.plot import default_importance_png, last_importance, plot_checkpoint, plot_run
from snzoo.train import METRICS_FILE, read_metrics
from snzoo_cli.output import echo_json


@click.command("plot")
@click.argument("target")
@click.option("--out", type=click.Path(), help="Run directory: the folder for the PNGs (default TARGET/plots). "
              "Checkpoint or entry: the PNG file (default ./<name>-importance.png).")
@click.option("--json", "as_json", is_flag=True, help="Print the written files and the importance weights as JSON.")
def plot_command(target: str, out: str | None, as_json: bool) -> None:
    """Plot a run directory's curves (loss, top-1, lr, importance) or a checkpoint's SN importance weights.

    TARGET: a run directory (holding metrics.jsonl), a checkpoint file or a zoo entry name.
    """
    if (Path(target) / METRICS_FILE).is_file():
        files = plot_run(target, out)
        importance = last_importance(read_metrics(target))
        result = {"target": target, "kind": "run", "files": [str(f) for f in files],
                  "importance": importance["layers"] if importance else None}
    else:
        out_png = Path(out) if out else default_importance_png(target)
        weights = plot_checkpoint(target, out_png)
        result = {"target": target, "kind": "checkpoint", "files": [str(out_png)], "importance": weights}
    if as_json:
        echo_json(result)
        return
    for path in result["files"]:
        click.echo(path)


COMMANDS = [plot_command]
