"""`snzoo export`: a thin wrapper over snzoo.export."""

from __future__ import annotations

from pathlib import Path

import click

from snzoo import create_model
from snzoo.export import (MIN_OPSET, ExportError, check_export, check_opset, check_output, example_input,
                          export_onnx, export_torchscript)
from snzoo.weights import hash_file
from snzoo_cli.output import echo_json, human_size

# Float32 exports of the fused formulation differ from eager by ~1e-6 on typical logits; 1e-3 flags real errors.
CHECK_TOLERANCE = 1e-3
CHECK_BATCH = 2  # not the exported batch size of 1, so --check also exercises the free batch axis


@click.command("export")
@click.argument("name")
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(["onnx", "torchscript"]), default="onnx", show_default=True,
              help="ONNX (input 'input', output 'logits', free batch axis) or TorchScript.")
@click.option("--size", default=224, show_default=True, type=click.IntRange(min=1), help="Input height and width.")
@click.option("--opset", default=MIN_OPSET, show_default=True, type=int, help=f"ONNX opset ({MIN_OPSET} or later).")
@click.option("--method", type=click.Choice(["trace", "script"]), default="trace", show_default=True,
              help="TorchScript: trace, or script the SN layers (right for any input size) and trace the rest.")
@click.option("--checkpoint", type=click.Path(), help="Export this file (original format, state dict or safetensors) instead of the published weights.")
@click.option("--arch", help="Architecture of --checkpoint (default: NAME's).")
@click.option("--check", is_flag=True, help=f"Compare the exported model with eager PyTorch on random input (fails above {CHECK_TOLERANCE:g}).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def export_command(name, out, fmt, size, opset, method, checkpoint, arch, check, as_json) -> None:
    """Export zoo entry or architecture NAME (with its pretrained weights, or --checkpoint) to file OUT."""
    if arch and not checkpoint:
        raise click.UsageError("--arch names the architecture of --checkpoint; pass --checkpoint FILE too")
    check_output(out)
    if fmt == "onnx":
        check_opset(opset)
    if checkpoint:
        model = create_model(arch or name, checkpoint_path=checkpoint)
    else:
        model = create_model(name, pretrained=True)
    if fmt == "onnx":
        path = export_onnx(model, out, size=size, opset=opset)
    else:
        path = export_torchscript(model, out, size=size, method=method)
    report = {"name": name, "architecture": getattr(model, "architecture", arch or name), "format": fmt,
              "path": str(path), "size": size}
    report.update({"opset": opset} if fmt == "onnx" else {"method": method})
    if checkpoint:
        report["checkpoint"] = str(checkpoint)
    digests = hash_file(Path(path))
    report.update(bytes=digests.size, sha256=digests.sha256)
    if check:
        diff = check_export(model, path, example_input(model, CHECK_BATCH, size))
        report["max_abs_diff"] = diff
        if not diff <= CHECK_TOLERANCE:  # also catches NaN
            raise ExportError(f"{path}: outputs differ from eager PyTorch by {diff:.3g} (more than {CHECK_TOLERANCE:g})")
    if as_json:
        echo_json(report)
        return
    text = f"{path}: {fmt} export of {name} at {size}x{size} ({human_size(digests.size)}), sha256 {digests.sha256}"
    if check:
        text += f"; max |exported - eager| = {report['max_abs_diff']:.2e}"
    click.echo(text)


COMMANDS = [export_command]
