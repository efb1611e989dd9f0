"""`python -m snzoo.train ENTRY ...` (what torchrun launches): the `snzoo train` command."""

from snzoo_cli.main import run_command
from snzoo_cli.train_commands import train_command

if __name__ == "__main__":
    run_command(train_command, prog_name="python -m snzoo.train")
