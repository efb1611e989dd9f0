"""`snzoo list`, `snzoo info` and `snzoo inspect`."""

from __future__ import annotations

import json

import click

import snzoo
from snzoo.tools.describe import describe
from snzoo.tools.inspect import importance_table, inspect_importance
from snzoo.zoo import zoo_table_markdown
from snzoo_cli.output import echo_json


@click.command("list")
@click.argument("pattern", default="*")
@click.option("--pretrained", is_flag=True, help="List zoo entries (ARCH.TAG) with weights instead of architectures.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
@click.option("--markdown", is_flag=True, help="Print the zoo table of the README (all entries).")
@click.option("--task", type=click.Choice(["detection", "segmentation"]),
              help="List the zoo's fine-tuned task entries (MODEL.TAG) of this task instead.")
def list_command(pattern: str, pretrained: bool, as_json: bool, markdown: bool, task) -> None:
    """List architectures, or zoo entries with --pretrained, matching PATTERN (fnmatch, e.g. 'resnet50*')."""
    if markdown:
        click.echo(zoo_table_markdown(), nl=False)
        return
    if task:
        return _list_task_entries(pattern, task, as_json)
    names = snzoo.list_models(pattern, pretrained=pretrained)
    if not pretrained:
        echo_json(names) if as_json else click.echo("\n".join(names))
        return
    rows = []
    for name in names:
        entry = snzoo.get_entry(name)
        metrics = next(iter(entry.metrics.values()), None)
        rows.append({
            "name": name,
            "default": entry.default,
            "top1": metrics.top1 if metrics else None,
            "top5": metrics.top5 if metrics else None,
        })
    if as_json:
        echo_json(rows)
        return
    for row in rows:
        mark = "*" if row["default"] else " "
        click.echo(f"{row['name']:<40} {mark} top-1 {_num(row['top1'])}  top-5 {_num(row['top5'])}")


def _list_task_entries(pattern: str, task: str, as_json: bool) -> None:
    from snzoo.tasks import get_task_entry, list_task_entries

    rows = [{"name": name, "backbone": entry["backbone"], "metrics": entry["metrics"]}
            for name, entry in ((n, get_task_entry(n)) for n in list_task_entries(pattern, task))]
    if as_json:
        echo_json(rows)
        return
    for row in rows:
        click.echo(f"{row['name']:<50} from {row['backbone']}")


def _task_info(name: str, as_json: bool) -> None:
    from snzoo.tasks import get_task_entry

    entry = get_task_entry(name)
    if as_json:
        echo_json(entry)
        return
    click.echo(name)
    click.echo(f"  task          {entry['task']}: {entry['model']} ({json.dumps(entry['model_kwargs'], sort_keys=True)})")
    click.echo(f"  backbone      {entry['backbone']} ({entry['backbone_architecture']})")
    click.echo(f"  classes       {entry['num_classes']}: {', '.join(entry['classes'])}")
    for dataset, metrics in entry["metrics"].items():
        click.echo(f"  metrics       {dataset}: {json.dumps(metrics, sort_keys=True)}")
    for i, source in enumerate(entry["sources"], 1):
        click.echo(f"  source {i}      {source['url']} ({source['kind']}, {source['file_name']}; sha256 {source['sha256']})")
    for note in entry.get("notes", []):
        click.echo(f"  note          {note}")


def _num(value) -> str:
    return "  -  " if value is None else f"{value:5.2f}"


@click.command("info")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def info_command(name: str, as_json: bool) -> None:
    """Describe an architecture or zoo entry (or task entry): parameters, sources, checksums, metrics, eval config,
    recipe."""
    if name in snzoo.zoo.manifest().task_entries:
        return _task_info(name, as_json)
    info = describe(name)
    if as_json:
        echo_json(info)
        return
    click.echo(f"{info['name']}")
    click.echo(f"  architecture  {info['architecture']} (ResNet-{info['depth']} v{info['version']}, norm {info['norm']})")
    click.echo(f"  parameters    {info['param_count']:,} ({info['state_dict_keys']} state_dict keys)")
    entry = info["entry"]
    if entry is None:
        click.echo("  weights       none published for this architecture")
    else:
        norm = ", ".join(f"{k}={v}" for k, v in entry["norm"].items())
        click.echo(f"  norm          {norm}")
        click.echo(f"  classes       {entry['num_classes']}")
        for dataset, m in entry["metrics"].items():
            click.echo(f"  metrics       {dataset}: top-1 {_num(m['top1'])}, top-5 {_num(m['top5'])}")
        ev = entry["eval"]
        click.echo(
            f"  eval          resize {ev['resize']}, crop {ev['crop']}, {ev['interpolation']}, "
            f"mean {ev['mean']}, std {ev['std']}"
        )
        for i, source in enumerate(entry["sources"], 1):
            digest = (
                f"sha256 {source['sha256']}" if source["sha256"]
                else f"md5 {source['md5']}" if source["md5"] else "no published checksum"
            )
            click.echo(f"  source {i}      {source['url']} ({source['kind']}, {source['format']}, {source['file_name']}; {digest})")
        click.echo(f"  recipe        {json.dumps(entry['recipe'], sort_keys=True)}")
        click.echo(f"  provenance    {json.dumps(entry['provenance'], sort_keys=True)}")
        for note in entry.get("notes", []):
            click.echo(f"  note          {note}")
    if info["entries"]:
        click.echo(f"  zoo entries   {', '.join(info['entries'])}")
    click.echo(f"  cache         {info['cache_dir']}")


@click.command("inspect")
@click.argument("target", metavar="NAME|FILE")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list, one object per SN layer.")
def inspect_command(target: str, as_json: bool) -> None:
    """The IN / LN / BN importance weights of every SN layer (after softmax, or sparsestmax for Sparse SN) of a zoo
    entry or architecture (its pretrained weights) or a checkpoint FILE; one row per layer."""
    rows = inspect_importance(target)
    if as_json:
        echo_json(rows)
    else:
        click.echo(importance_table(rows))


COMMANDS = [list_command, info_command, inspect_command]
