"""`snzoo build-kernel`: a thin wrapper over snzoo.nn.cpu_kernels.build."""

from __future__ import annotations

import click

from snzoo.nn import cpu_kernels


@click.command("build-kernel")
def build_kernel_command() -> None:
    """Build snzoo's SN CPU kernel now (else the first eval-mode SN forward on the CPU builds it) and print where it
    lives. Useful in a container image or before many jobs start at once."""
    click.echo(f"SN CPU kernel: {cpu_kernels.build()}")


COMMANDS = [build_kernel_command]
