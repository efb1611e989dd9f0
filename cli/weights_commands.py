"""`snzoo download | verify | convert | pin | cache | export-hf`: thin wrappers over snzoo.tools.weights,
snzoo.weights and snzoo.hub."""

from __future__ import annotations

from pathlib import Path

import click

from snzoo import zoo
from snzoo.hub import export_hf
from snzoo.tools.weights import convert_checkpoint, download, pin_file, verify_entry, verify_file
from snzoo.weights import cache_dir, cache_files, clean_cache, is_pinned, names_a_file, require_pinned_default
from snzoo_cli.output import echo_json, human_size


@click.command("download")
@click.argument("names", nargs=-1)
@click.option("--all", "all_entries", is_flag=True, help="Every entry of the zoo.")
@click.option("--source", "source_url", help="Fetch from this URL, path, hf-hub:... or Google Drive link instead.")
@click.option("--file", "file", type=click.Path(exists=True, dir_okay=False), help="Use a file downloaded by hand.")
@click.option("--require-pinned", is_flag=True, default=None, help="Refuse files without a published checksum (also SNZOO_REQUIRE_PINNED=1).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of the cached files.")
def download_command(names, all_entries, source_url, file, require_pinned, quiet, as_json) -> None:
    """Fetch, verify and convert the weights of NAMES (ARCH.TAG or ARCH) into the cache."""
    if all_entries:
        names = zoo.list_models(pretrained=True)
        if require_pinned_default() if require_pinned is None else require_pinned:
            # With --all, --require-pinned selects the entries that have a published checksum.
            unpinned = [n for n in names if not any(is_pinned(s) for s in zoo.get_entry(n).sources)]
            names = [n for n in names if n not in unpinned]
            if unpinned:
                click.echo(f"skipped {len(unpinned)} entries without a published checksum: {', '.join(unpinned)}",
                           err=True)
    if not names:
        raise click.UsageError("name at least one entry, or use --all")
    if (file or source_url) and len(names) > 1:
        raise click.UsageError("--file and --source apply to one entry at a time")
    rows = []
    for name in names:
        entry = zoo.get_entry(name)
        path = download(entry.name, file=file, source_url=source_url, require_pinned=require_pinned,
                        progress=False if quiet else None)
        rows.append({"name": entry.name, "path": str(path), "size": path.stat().st_size})
        if not as_json:
            click.echo(f"{entry.name}: {path} ({human_size(path.stat().st_size)})")
    if as_json:
        echo_json(rows)


@click.command("verify")
@click.argument("target")
@click.option("--arch", help="With a FILE: check its keys and shapes against this architecture.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def verify_command(target, arch, as_json) -> None:
    """Re-check an entry's cached weights (full re-hash, keys, shapes) or a checkpoint FILE."""
    report = verify_file(target, arch) if names_a_file(target) else verify_entry(target)
    if as_json:
        echo_json(report)
        return
    where = report.get("name") or report["path"]
    click.echo(f"{where}: OK  sha256 {report['sha256']}  {human_size(report['size'])}")
    if report.get("entries"):
        click.echo(f"  matches the published file of {', '.join(report['entries'])}")


@click.command("convert")
@click.argument("src", type=click.Path(exists=True, dir_okay=False))
@click.argument("dst", type=click.Path(dir_okay=False))
@click.option("--arch", required=True, help="The architecture the checkpoint belongs to, e.g. resnet50v1_sn.")
@click.option("--to", "to", type=click.Choice(["snzoo", "detectron"]), default="snzoo", show_default=True,
              help="snzoo: canonical safetensors; detectron: {'model': state_dict} for Detectron.pytorch-style code.")
@click.option("--fpn", is_flag=True, help="With --to detectron: keys under Conv_Body.conv_body. (an FPN body).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def convert_command(src, dst, arch, to, fpn, as_json) -> None:
    """Convert a checkpoint (original format, state dict, safetensors or Detectron.pytorch) into checked DST."""
    if fpn and to != "detectron":
        raise click.UsageError("--fpn applies only to --to detectron")
    report = convert_checkpoint(src, dst, arch, to=to, fpn=fpn)
    layout = "" if to == "snzoo" else f" (detectron{' FPN' if fpn else ''} layout)"
    echo_json(report) if as_json else click.echo(f"{dst}: {report['architecture']}{layout}, sha256 {report['sha256']}")


@click.command("pin")
@click.argument("name")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--write", "manifest", type=click.Path(dir_okay=False), help="Write the pins into this manifest (shipped or overlay).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def pin_command(name, file, manifest, as_json) -> None:
    """Print the sha256, md5 and size of a verified FILE of entry NAME; --write puts them into a manifest."""
    report = pin_file(name, file, manifest)
    if as_json:
        echo_json(report)
        return
    click.echo(f'"sha256": "{report["sha256"]}", "md5": "{report["md5"]}", "size": {report["size"]}')
    if manifest:
        click.echo(f"written into {manifest} (entry {report['name']}, source {report['source']})")


@click.group("cache")
def cache_group() -> None:
    """Inspect or clean the weights cache (SNZOO_CACHE, else $TORCH_HOME/hub/checkpoints/snzoo)."""


@cache_group.command("path")
def cache_path_command() -> None:
    """Print the cache directory."""
    click.echo(str(cache_dir()))


@cache_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
def cache_list_command(as_json) -> None:
    """List cached files with their kind (canonical, record, partial, original) and size."""
    rows = cache_files()
    if as_json:
        echo_json(rows)
        return
    for row in rows:
        click.echo(f"{row['kind']:<10} {human_size(row['size']):>10}  {row['file']}")


@cache_group.command("clean")
@click.argument("names", nargs=-1)
@click.option("--partial", is_flag=True, help="Only interrupted downloads.")
def cache_clean_command(names, partial) -> None:
    """Delete cached files: everything, the files of NAMES, or only partial downloads."""
    entries = [zoo.get_entry(n).name for n in names] if names else None
    removed = clean_cache(entries, partial_only=partial)
    click.echo(f"removed {len(removed)} file(s) from {cache_dir()}")



@click.command("export-hf")
@click.argument("name")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--repo-id", help="ORG/REPO the folder will be uploaded to (used in the model card).")
@click.option("--overwrite", is_flag=True, help="Replace an existing non-empty OUT_DIR.")
def export_hf_command(name, out_dir, repo_id, overwrite) -> None:
    """Write a ready-to-upload Hugging Face model folder for entry NAME: weights, config.json, model card."""
    path = export_hf(name, Path(out_dir), overwrite=overwrite, repo_id=repo_id)
    click.echo(f"{path}: model.safetensors, config.json, README.md")


COMMANDS = [download_command, verify_command, convert_command, pin_command, cache_group, export_hf_command]
