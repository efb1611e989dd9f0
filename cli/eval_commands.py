"""`snzoo eval`: a thin wrapper over snzoo.eval."""

from __future__ import annotations


import click

from snzoo import zoo
from snzoo.data import DECODERS, INTERPOLATIONS
from snzoo.eval import (
    append_results,
    append_task_results,
    check_results_file,
    evaluate_model,
    evaluate_task_model,
    run_suite,
    task_result_line,
    write_suite_results,
)
from snzoo_cli.output import echo_json


def _names(patterns: tuple[str, ...]) -> list[str]:
    names = []
    for pattern in patterns:
        if any(c in pattern for c in "*?["):
            matched = zoo.list_models(pattern, pretrained=True)
            if not matched:
                raise click.UsageError(f"no zoo entry matches {pattern!r}; `snzoo list --pretrained` shows them")
            names += matched
        else:
            names.append(pattern)
    return names


def _line(result) -> str:
    text = (f"{result.model}: top-1 {result.top1:.3f}  top-5 {result.top5:.3f}  on {result.n} images"
            f"{' (first ' + str(result.limit) + ' only)' if result.limit else ''}  {result.images_per_s:.1f} img/s")
    if result.published:
        p = result.published
        text += f"  (published {p['top1']:.2f} / {p['top5']:.2f}: {p['top1_diff']:+.2f} top-1)"
    return text


def _eval_task(names, task, data, split, batch_size, workers, device, limit, results_file, quiet, as_json) -> None:
    """`snzoo eval RUN --task detection|segmentation`: COCO AP or mIoU of fine-tuned task models."""
    if not names or data is None:
        raise click.UsageError(f"--task {task}: name a `snzoo finetune --task {task}` run directory (or its "
                               "entry.json) and pass --data")
    if results_file:
        check_results_file(results_file)
    results = []
    for name in names:
        result = evaluate_task_model(name, data, task=task, split=split or "val", batch_size=batch_size,
                                     workers=workers or 0, device=device, limit=limit,
                                     progress=False if quiet or as_json else None)
        results.append(result)
        if not as_json:
            click.echo(task_result_line(result))
    if results_file:
        append_task_results(results_file, results)
    if as_json:
        echo_json(results[0].to_dict() if len(results) == 1 else [r.to_dict() for r in results])


@click.command("eval")
@click.argument("names", nargs=-1)
@click.option("--task", type=click.Choice(["classification", "detection", "segmentation"]), default="classification",
              show_default=True, help="detection / segmentation: NAMES are `snzoo finetune --task` run directories "
              "(or their entry.json); COCO box / mask AP or mIoU on --data's --split (default val).")
@click.option("--data", type=click.Path(),
              help="Class folders, a .txt list file, fashion-mnist (its test set), or ImageNet val as Hugging Face "
                   "datasets (save_to_disk folder, parquet shards, hfds:ORG/NAME), webdataset shards "
                   "(wds:PATTERN, e.g. val-{0000..0063}.tar), ILSVRC2012_img_val.tar or the flat folder of "
                   "ILSVRC2012_val_*.JPEG with the devkit.")
@click.option("--split", help="Hugging Face datasets: the split (default validation); --task: the COCO / VOC split "
              "(default val).")
@click.option("--image-column", help="Hugging Face datasets: the image column (default: found by name).")
@click.option("--label-column", help="Hugging Face datasets: the label column (default: found by name).")
@click.option("--devkit", type=click.Path(), help="ILSVRC2012_devkit_t12.tar.gz (or its folder, or its ground-truth "
              "file beside meta.mat), when it does not lie beside the official val images.")
@click.option("--real-labels", is_flag=False, flag_value="", default=None, metavar="[FILE]",
              help="Also score ImageNet-ReaL: the published real.json (fetched and verified), or FILE.")
@click.option("--classes-in-data", is_flag=True,
              help="Restrict the logits to the classes present in --data before top-k (ImageNet-R, ImageNet-A).")
@click.option("--suite", type=click.Choice(["robustness"]),
              help="Evaluate on every test set under --data-root and write timm-style results-*.csv files.")
@click.option("--data-root", type=click.Path(), help="With --suite: the folder holding imagenet/, imagenetv2-"
              "matched-frequency/, imagenet-sketch/, imagenet-r/, imagenet-a/ (and optionally real.json).")
@click.option("--results-dir", type=click.Path(file_okay=False), default=".", show_default=True,
              help="With --suite: where the results-*.csv files go.")
@click.option("--root", type=click.Path(), help="Where a list file's relative paths start (default: its folder).")
@click.option("--arch", help="Architecture of --checkpoint (e.g. resnet50v1_sn).")
@click.option("--checkpoint", type=click.Path(), help="Evaluate this file (original format, state dict or safetensors).")
@click.option("--resize", type=click.IntRange(min=1), help="Override the entry's resize (short side).")
@click.option("--crop", type=click.IntRange(min=1), help="Override the entry's center crop.")
@click.option("--interpolation", type=click.Choice(list(INTERPOLATIONS)), help="Override the resize interpolation.")
@click.option("--decoder", type=click.Choice(list(DECODERS)), default="pil", show_default=True,
              help="Image decoding: pil (the published protocol) or torchvision (libjpeg-turbo for JPEGs, the same "
                   "transform on tensors; faster, with resize rounding slightly different from PIL's).")
@click.option("--batch-size", "-b", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--workers", "-j", type=click.IntRange(min=0), help="DataLoader workers (default: the CPU count).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, ...")
@click.option("--amp", type=click.Choice(["bfloat16", "float16"]), help="Autocast dtype (norm statistics stay float32).")
@click.option("--channels-last", is_flag=True, help="channels_last memory format.")
@click.option("--limit", type=click.IntRange(min=1), help="Only the first N images (a quick check; stated in the output).")
@click.option("--skip-bad", is_flag=True, help="Skip unreadable images, count them and list them at the end.")
@click.option("--per-class", is_flag=True, help="Add per-class top-1 to the JSON output.")
@click.option("--results-file", type=click.Path(dir_okay=False), help="Append timm-style rows to a .csv or .json file.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (a list for several models).")
def eval_command(names, task, data, split, image_column, label_column, devkit, real_labels, classes_in_data, suite,
                 data_root, results_dir, root, arch, checkpoint, resize, crop, interpolation, decoder, batch_size,
                 workers, device, amp, channels_last, limit, skip_bad, per_class, results_file, quiet,
                 as_json) -> None:
    """Evaluate zoo entries NAMES (ARCH.TAG, ARCH or a glob) with the 1-crop protocol on --data, or on every set
    of a --suite; with --task, fine-tuned detectors and segmenters."""
    if task != "classification":
        return _eval_task(names, task, data, split, batch_size, workers, device, limit, results_file, quiet, as_json)
    if checkpoint is None and not names:
        raise click.UsageError("name a zoo entry, or pass --checkpoint FILE --arch ARCH")
    if (data is None) == (suite is None) or (suite is None) != (data_root is None):
        raise click.UsageError("pass --data DATA, or --suite robustness with --data-root DIR")
    targets = _names(names) if names else [None]
    if checkpoint is not None and len(targets) > 1:
        raise click.UsageError("--checkpoint evaluates one model; name at most one entry with it")
    if results_file:
        check_results_file(results_file)
    options = dict(checkpoint=checkpoint, arch=arch, resize=resize, crop=crop, interpolation=interpolation, decoder=decoder,
                   skip_bad=skip_bad, batch_size=batch_size, workers=workers, device=device, amp=amp or False,
                   channels_last=channels_last, limit=limit, progress=False if quiet or as_json else None)
    if suite:
        by_set = run_suite(targets, data_root, suite=suite,
                           report=None if as_json else lambda key, r: click.echo(f"{key:<30} {_line(r)}"), **options)
        files = write_suite_results(by_set, results_dir, suite)
        if as_json:
            echo_json({key: [r.to_dict() for r in found] for key, found in by_set.items()})
        else:
            click.echo("wrote " + ", ".join(str(f) for f in files))
        return
    results = []
    for name in targets:
        result = evaluate_model(
            name, data=data, root=root, split=split, image_column=image_column, label_column=label_column,
            devkit=devkit, real_labels=real_labels, classes_in_data=classes_in_data, per_class=per_class, **options,
        )
        results.append(result)
        if not as_json:
            click.echo(_line(result))
            if result.real is not None:
                click.echo(f"  ImageNet-ReaL: top-1 {result.real['top1']:.3f}  top-5 {result.real['top5']:.3f}  "
                           f"on {result.real['n']} images with ReaL labels")
            for bad in result.skipped:
                click.echo(f"  skipped {bad['path']}: {bad['reason']}")
    if results_file:
        append_results(results_file, results)
    if as_json:
        echo_json(results[0].to_dict() if len(results) == 1 else [r.to_dict() for r in results])


COMMANDS = [eval_command]
