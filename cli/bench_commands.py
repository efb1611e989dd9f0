"""`snzoo bench`: a thin wrapper over snzoo.tools.bench.benchmark_model."""

from __future__ import annotations

import click

from snzoo.tools.bench import benchmark_model
from snzoo_cli.output import echo_json


def _lines(result: dict) -> list[str]:
    settings = (f"batch {result['batch']}, {result['in_chans']}x{result['size']}x{result['size']}, {result['device']}, "
                f"{result['amp'] or 'float32'}{', channels_last' if result['channels_last'] else ''}, "
                f"{result['steps']} timed steps after {result['warmup']}, {result['threads']} threads, "
                f"torch {result['torch']}, SN implementation {result['sn_implementation']}"
                f"{' (eval on the CPU kernel)' if result['sn_cpu_kernel'] else ''}")
    return [
        f"{result['model']}: eval {result['eval_images_per_s']:.1f} img/s ({result['eval_ms_per_batch']:.1f} ms/batch)  "
        f"train {result['train_images_per_s']:.1f} img/s ({result['train_ms_per_step']:.1f} ms/step)",
        f"  {settings}",
    ]


@click.command("bench")
@click.argument("name")
@click.option("--batch", default=8, show_default=True, type=click.IntRange(min=1), help="Images per batch.")
@click.option("--size", default=224, show_default=True, type=click.IntRange(min=1), help="Image height and width.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, ...")
@click.option("--amp", type=click.Choice(["bfloat16", "float16"]), help="Autocast dtype (norm statistics stay float32).")
@click.option("--channels-last", is_flag=True, help="channels_last memory format.")
@click.option("--steps", default=10, show_default=True, type=click.IntRange(min=1), help="Timed batches per phase.")
@click.option("--warmup", default=3, show_default=True, type=click.IntRange(min=0), help="Untimed batches first.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def bench_command(name, batch, size, device, amp, channels_last, steps, warmup, as_json) -> None:
    """Eval and train throughput of NAME (an architecture or zoo entry, random weights) on random images.

    Train is forward + backward + SGD step. Numbers vary with the machine and its load: compare models
    measured one after the other on the same machine.
    """
    result = benchmark_model(name, batch=batch, size=size, device=device, amp=amp, channels_last=channels_last,
                             steps=steps, warmup=warmup)
    if as_json:
        echo_json(result)
    else:
        for line in _lines(result):
            click.echo(line)


COMMANDS = [bench_command]
