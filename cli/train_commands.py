"""`snzoo train` and `snzoo finetune`: thin wrappers over snzoo.train."""

from __future__ import annotations

from pathlib import Path

import click

from snzoo_cli.output import echo_json


def run_options(command):
    """Options shared by train and finetune: where, how fast, how safely."""
    options = [
        click.option("--data", required=True, help="fashion-mnist, or a folder with train/ and val/ class folders; "
                     "finetune --task detection: a COCO-format folder; --task segmentation: a VOC-style folder."),
        click.option("--output", "-o", required=True, type=click.Path(file_okay=False), help="Run directory."),
        click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Recipe override, e.g. schedule.type=step (repeatable)."),
        click.option("--epochs", type=click.IntRange(min=1), help="Override the recipe's epochs."),
        click.option("--device", default="cpu", show_default=True, help="cpu or cuda (torchrun picks the GPU by LOCAL_RANK)."),
        click.option("--workers", "-j", type=click.IntRange(min=0), help="DataLoader workers (default: the CPU count)."),
        click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True),
        click.option("--amp", type=click.Choice(["bfloat16", "float16"]), help="Autocast dtype."),
        click.option("--channels-last", is_flag=True),
        click.option("--compile", "compile_model", is_flag=True, help="torch.compile the model."),
        click.option("--accum-steps", type=click.IntRange(min=1), default=1, show_default=True, help="Gradient accumulation micro-batches per step."),
        click.option("--sync-stats/--no-sync-stats", default=None, help="Synchronise SN statistics over processes (one process per recipe device); default: the recipe's `statistics`."),
        click.option("--checkpoint-every", type=click.IntRange(min=0), default=0, help="Also checkpoint every N steps (always at epoch ends)."),
        click.option("--log-every", type=click.IntRange(min=1), default=10, show_default=True, help="Log the loss every N steps and at epoch ends (where the loss is read from the device)."),
        click.option("--resume", is_flag=True, help="Continue the run in --output from its last checkpoint."),
        click.option("--max-steps", type=click.IntRange(min=1), help="Stop after N steps (a quick check)."),
        click.option("--subset", type=click.IntRange(min=1), help="Train on the first N training images only."),
        click.option("--val-subset", type=click.IntRange(min=1), help="Validate on the first N images only."),
        click.option("--deterministic", is_flag=True, help="Deterministic algorithms (exact resume on CPU)."),
        click.option("--name", "entry_name", help="Name ARCH.TAG for the trained weights' entry."),
        click.option("--json", "as_json", is_flag=True, help="Print the run summary as JSON."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _config(kw: dict) -> dict:
    return dict(
        device=kw["device"], workers=kw["workers"], seed=kw["seed"], amp=kw["amp"], channels_last=kw["channels_last"],
        compile=kw["compile_model"], accum_steps=kw["accum_steps"], sync_stats=kw["sync_stats"],
        checkpoint_every=kw["checkpoint_every"], log_every=kw["log_every"], resume=kw["resume"], max_steps=kw["max_steps"], subset=kw["subset"],
        val_subset=kw["val_subset"], deterministic=kw["deterministic"], entry_name=kw["entry_name"],
    )


def _report(summary: dict, as_json: bool) -> None:
    if as_json:
        echo_json(summary)
    elif "weights" in summary:
        click.echo(f"weights {summary['weights']} (sha256 {summary['sha256']}), entry {summary['entry']}")


@click.command("train")
@click.argument("name")
@click.option("--recipe", "recipe_file", type=click.Path(exists=True, dir_okay=False), help="Recipe overrides (JSON or YAML); a full recipe for an architecture without entries.")
@click.option("--batch", help="Override the batch as DEVICESxPER_DEVICE, e.g. 8x2.")
@click.option("--lr", type=float, help="Override the recipe's base lr (at its reference batch).")
@click.option("--init", help="Start from this zoo entry's weights or a checkpoint file.")
@run_options
def train_command(name, recipe_file, batch, lr, init, **kw) -> None:
    """Train NAME (a zoo entry reproduces its recipe) on --data; torchrun -m snzoo.train for many processes."""
    from snzoo.train import train_entry

    summary = train_entry(name, kw["data"], Path(kw["output"]), recipe_file=recipe_file, overrides=kw["overrides"],
                          epochs=kw["epochs"], batch=batch, lr=lr, init=init, **_config(kw))
    _report(summary, kw["as_json"])


@click.command("finetune")
@click.argument("name")
@click.option("--task", type=click.Choice(["classification", "detection", "segmentation"]), default="classification",
              show_default=True, help="detection: Faster / Mask R-CNN on NAME's backbone; segmentation: DeepLabV3.")
@click.option("--model", "task_model", help="The task model, e.g. maskrcnn_resnet50_fpn_sn (default: "
              "fasterrcnn_resnet50_fpn_sn, deeplabv3_resnet50_sn or _101_ by the backbone).")
@click.option("--batch", help="DEVICESxPER_DEVICE (default: 1x32; the task recipe's for detection / segmentation).")
@click.option("--lr", type=float, help="Peak learning rate at that batch (default: 0.01, cosine to 0; the task "
              "recipe's lr scaled to the batch for detection / segmentation).")
@click.option("--num-classes", type=click.IntRange(min=1), help="Classes of the new head (default: the data's).")
@click.option("--init", type=click.Path(exists=True, dir_okay=False), help="Start from this checkpoint file instead of "
              "the entry's weights (NAME, an entry or architecture, says what it holds).")
@click.option("--freeze", multiple=True, help="Freeze a module and its statistics: conv1, sn1, layer1, ... (repeatable).")
@click.option("--reset-importance", is_flag=True, help="Start the SN importance weights from uniform again.")
@click.option("--reopen-ssn", is_flag=True, help="Re-open fixed one-hot Sparse SN importance weights so they can move again.")
@click.option("--drop-bn/--keep-bn", default=None, help="Drop the SN BN term (default: drop at per-device batch 1).")
@click.option("--no-norm-decay", is_flag=True, help="No weight decay on norm and importance weights (detection style).")
@run_options
def finetune_command(name, task, task_model, batch, lr, num_classes, init, freeze, reset_importance, reopen_ssn,
                     drop_bn, no_norm_decay, **kw) -> None:
    """Fine-tune pretrained entry NAME on --data: a new classifier for its classes, or (--task) a detector or
    segmenter on its backbone."""
    from snzoo.train import finetune

    if task != "classification" and (freeze or reset_importance or reopen_ssn):
        raise click.UsageError("--freeze, --reset-importance and --reopen-ssn are for classification; task models "
                               "freeze stages with --set model_kwargs.trainable_layers=N")
    epochs = kw["epochs"] or (10 if task == "classification" else None)
    summary = finetune(name, kw["data"], Path(kw["output"]), task=task, model=task_model, epochs=epochs, batch=batch, lr=lr,
                       norm_decay=not no_norm_decay, overrides=kw["overrides"], num_classes=num_classes,
                       freeze=tuple(freeze), reset_importance=reset_importance, reopen_ssn=reopen_ssn,
                       drop_bn=drop_bn, init=init, **_config(kw))
    _report(summary, kw["as_json"])


COMMANDS = [train_command, finetune_command]
