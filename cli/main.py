"""The `snzoo` command group: global options and one-line error reporting."""

from __future__ import annotations

import sys
import warnings

import click

import snzoo
from snzoo import zoo
from snzoo.errors import SnzooError


class SnzooGroup(click.Group):
    """Reports snzoo's errors as one line on stderr with exit code 1, instead of a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except SnzooError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)


@click.group(cls=SnzooGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(snzoo.__version__, prog_name="snzoo")
@click.option(
    "--manifest",
    type=click.Path(exists=True, dir_okay=False),
    envvar="SNZOO_MANIFEST",
    help="An overlay manifest that adds entries or replaces fields of existing ones (also SNZOO_MANIFEST).",
)
def cli(manifest: str | None) -> None:
    """snzoo: the model zoo for Switchable Normalization."""
    warnings.showwarning = _show_warning
    zoo.set_overlay(manifest)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    # Warnings are for the user of the command: one line, without Python's file and line prefix.
    click.echo(f"warning: {message}", err=True)


def _register_commands() -> None:
    from snzoo_cli import (
        bench_commands,
        eval_commands,
        export_commands,
        kernel_commands,
        plot_commands,
        train_commands,
        weights_commands,
        zoo_commands,
    )

    for module in (zoo_commands, weights_commands, eval_commands, train_commands, plot_commands, export_commands,
                   bench_commands, kernel_commands):
        for command in module.COMMANDS:
            cli.add_command(command)


_register_commands()


def main() -> None:
    """Console entry point."""
    cli(prog_name="snzoo")


def run_command(command: click.Command, prog_name: str) -> None:
    """Run one command on its own (e.g. `python -m snzoo.train`) with the same one-line errors as `snzoo`."""
    warnings.showwarning = _show_warning
    try:
        command(prog_name=prog_name, standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        sys.exit(1)
    except SnzooError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
