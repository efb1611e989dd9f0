"""Bad input to every command: one clear error line, a non-zero exit code, no traceback, nothing half-written.

Each case runs the real command in-process. Inputs are tiny (a few 32x32 photographs, a ResNet-20 state dict,
the zoo's shipped ResNet-20 weights), and every case must fail before any real work (training, evaluation,
download), so the whole sweep takes seconds.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import snzoo
from snzoo.weights import cache_dir
from snzoo_cli.main import cli
from photos import photo_paths

SHIPPED = Path(snzoo.__file__).parent / "pretrained" / "resnet20_sn.fmnist_1x32_cos2.safetensors"
ENTRY = "resnet20_sn.fmnist_1x32_cos2"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inputs")
    paths = {
        "empty": root / "empty.pth",  # a zero-byte file
        "dir": root / "a_dir",
        "file": root / "plain.txt",  # a file where a folder is expected, and the parent of impossible outputs
        "missing": root / "missing.pth",
        "small": root / "small",  # 2 classes x 3 photographs in train/ and val/: fewer than any default batch
        "nodata": root / "no_images",  # train/ without class folders
        "good": root / "good.pth",
        "nan": root / "nan.pth",
        "ints": root / "ints.pth",
        "shipped": SHIPPED,
    }
    paths["empty"].write_bytes(b"")
    paths["dir"].mkdir()
    paths["file"].write_text("not a folder\n")
    for split in ("train", "val"):
        for label in ("a", "b"):
            folder = paths["small"] / split / label
            folder.mkdir(parents=True)
            for i, photo in enumerate(photo_paths()[:3]):
                Image.open(photo).convert("RGB").resize((32, 32)).save(folder / f"{i}.png")
    (paths["nodata"] / "train").mkdir(parents=True)
    torch.manual_seed(0)
    state = snzoo.create_model("resnet20_sn", num_classes=10).state_dict()
    torch.save(state, paths["good"])
    torch.save({k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in state.items()},
               paths["nan"])
    torch.save({k: v.long() if v.is_floating_point() else v for k, v in state.items()}, paths["ints"])

    def write(name: str, text: str) -> None:
        paths[name] = root / f"{name}.json"
        paths[name].write_text(text)

    write("recipe_epochs_str", json.dumps({"epochs": "many"}))
    write("recipe_batch_int", json.dumps({"batch": 5}))
    write("recipe_lr_str", json.dumps({"lr": {"base": "fast"}}))
    write("recipe_dropout_str", json.dumps({"dropout": "half"}))
    write("recipe_list", json.dumps([1, 2]))
    write("recipe_broken", "{epochs: 1")
    write("manifest_sources_str", json.dumps({"schema_version": 1, "entries": {ENTRY: {"sources": "x"}}}))
    write("manifest_classes_str", json.dumps({"schema_version": 1, "entries": {ENTRY: {"num_classes": "ten"}}}))
    write("manifest_entries_list", json.dumps({"schema_version": 1, "entries": []}))
    write("manifest_broken", "{not json")
    write("manifest_bad_name", json.dumps({"schema_version": 1, "entries": {"No Dot": {}}}))
    return paths


TRAIN_FM = ["train", "resnet20_sn", "--data", "fashion-mnist", "-o", "{out}/run"]
TRAIN_SMALL = ["train", "resnet20_sn", "--data", "{small}", "-o", "{out}/run"]
FINETUNE = ["finetune", "resnet20_sn", "--data", "{small}", "-o", "{out}/run"]
EVAL = ["eval", ENTRY, "--data", "fashion-mnist"]


def convert(src: str, dst: str = "{out}/w.safetensors") -> list[str]:
    return ["convert", src, dst, "--arch", "resnet20_sn"]


def eval_checkpoint(path: str) -> list[str]:
    return ["eval", "--checkpoint", path, "--arch", "resnet20_sn", "--data", "fashion-mnist"]


# (id, arguments, words the error line must hold); "{name}" is an input path, "{out}" the empty output folder.
CASES = [
    # names
    ("info-unknown-model", ["info", "resnet50v1_sm"], "unknown"),
    ("download-unknown-entry", ["download", "nope.x"], "unknown zoo entry"),
    ("download-no-name", ["download"], "name at least one entry"),
    ("cache-clean-unknown-entry", ["cache", "clean", "nope.x"], "unknown zoo entry"),
    ("bench-unknown-model", ["bench", "nope"], "unknown architecture"),
    ("plot-unknown-entry", ["plot", "nope.x"], "unknown zoo entry"),
    ("eval-unknown-entry", ["eval", "nope.x", "--data", "fashion-mnist"], "unknown zoo entry"),
    ("eval-no-model", ["eval", "--data", "fashion-mnist"], "name a zoo entry"),
    ("train-unknown-model", TRAIN_FM[:1] + ["nope"] + TRAIN_FM[2:], "unknown architecture"),
    ("finetune-unknown-entry", ["finetune", "nope.x", "--data", "{small}", "-o", "{out}/run"], "unknown zoo entry"),
    ("finetune-architecture-without-weights", ["finetune", "resnet18v2_gn", "--data", "{small}", "-o", "{out}/run"],
     "no pretrained weights"),
    ("export-unknown-model", ["export", "nope", "{out}/m.onnx"], "unknown"),
    ("export-hf-unknown-model", ["export-hf", "nope", "{out}/hf"], "unknown"),
    ("pin-unknown-entry", ["pin", "nope.x", "{shipped}"], "unknown"),
    ("verify-unknown-entry", ["verify", "nope.x"], "unknown zoo entry"),
    # missing, empty and wrong-kind paths
    ("verify-missing-file", ["verify", "{missing}"], "does not exist"),
    ("verify-empty-file", ["verify", "{empty}"], "cannot be read"),
    ("verify-directory", ["verify", "{dir}"], "not a file"),
    ("convert-missing-source", convert("{missing}"), "does not exist"),
    ("convert-empty-source", convert("{empty}"), "cannot be read"),
    ("convert-directory-source", convert("{dir}"), "is a directory"),
    ("download-missing-file", ["download", ENTRY, "--file", "{missing}"], "does not exist"),
    ("download-empty-file", ["download", ENTRY, "--file", "{empty}"], "size 0 bytes"),
    ("download-directory-source", ["download", ENTRY, "--source", "{dir}"], "could not get the weights"),
    ("pin-empty-file", ["pin", ENTRY, "{empty}"], "size 0 bytes"),
    ("eval-missing-data", EVAL[:2] + ["--data", "{missing}"], "does not exist"),
    ("eval-empty-data-folder", EVAL[:2] + ["--data", "{dir}"], "is empty"),
    ("eval-file-as-data", EVAL[:2] + ["--data", "{file}"], "relative/path label"),
    ("eval-missing-checkpoint", eval_checkpoint("{missing}"), "does not exist"),
    ("eval-empty-checkpoint", eval_checkpoint("{empty}"), "cannot be read"),
    ("train-missing-data", TRAIN_SMALL[:3] + ["{missing}"] + TRAIN_SMALL[4:], "neither a train/ folder"),
    ("train-file-as-data", TRAIN_SMALL[:3] + ["{file}"] + TRAIN_SMALL[4:], "neither a train/ folder"),
    ("train-data-without-images", TRAIN_SMALL[:3] + ["{nodata}"] + TRAIN_SMALL[4:], "is empty"),
    ("train-missing-init", TRAIN_SMALL + ["--batch", "1x4", "--init", "{missing}"], "does not exist"),
    ("train-missing-recipe", TRAIN_FM + ["--recipe", "{missing}"], "does not exist"),
    ("train-empty-recipe", TRAIN_FM + ["--recipe", "{empty}"], "not valid JSON"),
    ("train-directory-recipe", TRAIN_FM + ["--recipe", "{dir}"], "is a directory"),
    ("train-resume-without-run", TRAIN_SMALL + ["--batch", "1x4", "--resume"], "no run checkpoint"),
    ("export-missing-checkpoint", ["export", "resnet20_sn", "{out}/m.onnx", "--checkpoint", "{missing}"],
     "does not exist"),
    ("plot-missing-path", ["plot", "{missing}", "--out", "{out}/p.png"], "does not exist"),
    ("plot-empty-file", ["plot", "{empty}", "--out", "{out}/p.png"], "cannot be read"),
    ("plot-directory-without-run", ["plot", "{dir}", "--out", "{out}/p.png"], "not a run directory"),
    ("manifest-missing", ["--manifest", "{missing}", "list"], "does not exist"),
    ("manifest-empty", ["--manifest", "{empty}", "list", "--pretrained"], "invalid JSON"),
    ("manifest-directory", ["--manifest", "{dir}", "list"], "is a directory"),
    # corrupt weights
    ("verify-nan-weights", ["verify", "{nan}"], "non-finite"),
    ("verify-nan-weights-arch", ["verify", "{nan}", "--arch", "resnet20_sn"], "non-finite"),
    ("verify-int64-weights-arch", ["verify", "{ints}", "--arch", "resnet20_sn"], "int64"),
    ("verify-wrong-arch", ["verify", "{good}", "--arch", "resnet18v1_sn"], "does not match"),
    ("verify-unknown-arch", ["verify", "{good}", "--arch", "nope"], "unknown architecture"),
    ("convert-nan-weights", convert("{nan}"), "non-finite"),
    ("convert-int64-weights", convert("{ints}"), "int64"),
    ("eval-nan-checkpoint", eval_checkpoint("{nan}"), "non-finite"),
    ("eval-grayscale-checkpoint-without-entry", eval_checkpoint("{good}"), "name the checkpoint's entry"),
    ("export-nan-checkpoint", ["export", "resnet20_sn", "{out}/m.onnx", "--size", "32", "--checkpoint", "{nan}"],
     "non-finite"),
    ("export-int64-checkpoint", ["export", "resnet20_sn", "{out}/m.onnx", "--size", "32", "--checkpoint", "{ints}"],
     "int64"),
    ("train-nan-init", TRAIN_SMALL + ["--batch", "1x4", "--init", "{nan}"], "non-finite"),
    ("plot-nan-checkpoint", ["plot", "{nan}", "--out", "{out}/p.png"], "non-finite"),
    # malformed values
    ("eval-batch-abc", EVAL + ["-b", "abc"], "not a valid integer"),
    ("eval-batch-zero", EVAL + ["-b", "0"], "x>=1"),
    ("eval-batch-negative", EVAL + ["-b", "-3"], "x>=1"),
    ("eval-workers-negative", EVAL + ["-j", "-2"], "x>=0"),
    ("eval-limit-zero", EVAL + ["--limit", "0"], "x>=1"),
    ("eval-limit-negative", EVAL + ["--limit", "-1"], "x>=1"),
    ("eval-resize-zero", EVAL + ["--resize", "0"], "x>=1"),
    ("eval-crop-negative", EVAL + ["--crop", "-5"], "x>=1"),
    ("eval-unknown-device", EVAL + ["--device", "bogus"], "unknown device"),
    ("eval-results-file-not-csv-or-json", EVAL + ["--results-file", "{out}/r.txt"], ".csv or .json"),
    ("train-batch-abc", TRAIN_FM + ["--batch", "abc"], "DEVICESxPER_DEVICE"),
    ("train-batch-negative", TRAIN_FM + ["--batch", "-3"], "DEVICESxPER_DEVICE"),
    ("train-batch-zero-devices", TRAIN_FM + ["--batch", "0x4"], "batch.devices"),
    ("train-lr-nan", TRAIN_FM + ["--lr", "nan"], "lr.base"),
    ("train-lr-inf", TRAIN_FM + ["--lr", "inf"], "lr.base"),
    ("train-lr-negative", TRAIN_FM + ["--lr", "-1"], "lr.base"),
    ("train-lr-abc", TRAIN_FM + ["--lr", "abc"], "not a valid float"),
    ("train-epochs-zero", TRAIN_FM + ["--epochs", "0"], "x>=1"),
    ("train-epochs-negative", TRAIN_FM + ["--epochs", "-2"], "x>=1"),
    ("train-accum-steps-zero", TRAIN_FM + ["--accum-steps", "0"], "x>=1"),
    ("train-accum-steps-negative", TRAIN_FM + ["--accum-steps", "-1"], "x>=1"),
    ("train-max-steps-negative", TRAIN_FM + ["--max-steps", "-1"], "x>=1"),
    ("train-subset-negative", TRAIN_FM + ["--subset", "-5"], "x>=1"),
    ("train-val-subset-zero", TRAIN_FM + ["--val-subset", "0"], "x>=1"),
    ("train-checkpoint-every-negative", TRAIN_FM + ["--checkpoint-every", "-1"], "x>=0"),
    ("train-workers-negative", TRAIN_FM + ["-j", "-1"], "x>=0"),
    ("train-seed-negative", TRAIN_FM + ["--seed", "-1"], "x>=0"),
    ("train-log-every-zero", TRAIN_FM + ["--log-every", "0"], "x>=1"),
    ("train-unknown-device", TRAIN_SMALL + ["--device", "bogus"], "unknown device"),
    ("train-set-not-key-value", TRAIN_FM + ["--set", "lr.base"], "KEY=VALUE"),
    ("train-set-group-to-number", TRAIN_FM + ["--set", "schedule=5"], "schedule must be a group"),
    ("train-set-lr-word", TRAIN_FM + ["--set", "lr.base=fast"], "lr.base"),
    ("train-set-dropout-word", TRAIN_FM + ["--set", "dropout=half"], "dropout"),
    ("finetune-batch-abc", FINETUNE + ["--batch", "abc"], "DEVICESxPER_DEVICE"),
    ("finetune-batch-zero-devices", FINETUNE + ["--batch", "0x4"], "batch.devices"),
    ("finetune-lr-nan", FINETUNE + ["--batch", "1x4", "--lr", "nan"], "lr.base"),
    ("finetune-lr-zero", FINETUNE + ["--batch", "1x4", "--lr", "0"], "lr.base"),
    ("finetune-epochs-zero", FINETUNE + ["--batch", "1x4", "--epochs", "0"], "x>=1"),
    ("finetune-num-classes-zero", FINETUNE + ["--batch", "1x4", "--num-classes", "0"], "x>=1"),
    ("finetune-num-classes-negative", FINETUNE + ["--batch", "1x4", "--num-classes", "-1"], "x>=1"),
    ("finetune-freeze-unknown-module", FINETUNE + ["--batch", "1x4", "--freeze", "bogus"], "--freeze bogus"),
    ("finetune-invalid-entry-name", FINETUNE + ["--batch", "1x4", "--name", "no dot"], "--name"),
    ("export-size-zero", ["export", "resnet20_sn", "{out}/m.onnx", "--size", "0"], "x>=1"),
    ("export-opset-too-old", ["export", "resnet20_sn", "{out}/m.onnx", "--size", "32", "--opset", "3"], "opset 17 or later"),
    ("export-arch-without-checkpoint", ["export", "resnet20_sn", "{out}/m.onnx", "--arch", "resnet20_sn"],
     "--checkpoint"),
    ("bench-batch-abc", ["bench", "resnet20_sn", "--batch", "abc"], "not a valid integer"),
    ("bench-batch-zero", ["bench", "resnet20_sn", "--batch", "0"], "x>=1"),
    ("bench-steps-negative", ["bench", "resnet20_sn", "--steps", "-1"], "x>=1"),
    ("bench-unknown-device", ["bench", "resnet20_sn", "--size", "8", "--device", "bogus"], "unknown device"),
    # wrong types in a recipe file and in a --manifest overlay
    ("recipe-epochs-string", TRAIN_FM + ["--recipe", "{recipe_epochs_str}"], "epochs"),
    ("recipe-batch-number", TRAIN_FM + ["--recipe", "{recipe_batch_int}"], "batch must be a group"),
    ("recipe-lr-string", TRAIN_FM + ["--recipe", "{recipe_lr_str}"], "lr.base"),
    ("recipe-dropout-string", TRAIN_FM + ["--recipe", "{recipe_dropout_str}"], "dropout"),
    ("recipe-list", TRAIN_FM + ["--recipe", "{recipe_list}"], "mapping"),
    ("recipe-broken-json", TRAIN_FM + ["--recipe", "{recipe_broken}"], "not valid JSON"),
    ("manifest-sources-string", ["--manifest", "{manifest_sources_str}", "list", "--pretrained"], "sources"),
    ("manifest-num-classes-string", ["--manifest", "{manifest_classes_str}", "info", ENTRY], "num_classes"),
    ("manifest-entries-list", ["--manifest", "{manifest_entries_list}", "list", "--pretrained"], "entries"),
    ("manifest-broken-json", ["--manifest", "{manifest_broken}", "list", "--pretrained"], "invalid JSON"),
    ("manifest-bad-entry-name", ["--manifest", "{manifest_bad_name}", "list", "--pretrained"], "entry name"),
    ("manifest-overlay-then-train", ["--manifest", "{manifest_classes_str}"] + TRAIN_SMALL[:1] + [ENTRY]
     + TRAIN_SMALL[2:], "num_classes"),
    # unwritable outputs: a directory where a file goes, a file where a directory goes, a parent that is a file
    ("convert-output-is-directory", convert("{good}", "{dir}"), "is a directory"),
    ("convert-output-parent-is-file", convert("{good}", "{file}/w.safetensors"),
     "is a file, not a folder"),
    ("export-output-is-directory", ["export", "resnet20_sn", "{dir}", "--size", "32"], "is a directory"),
    ("export-output-parent-is-file", ["export", "resnet20_sn", "{file}/m.onnx", "--size", "32"],
     "is a file, not a folder"),
    ("export-hf-output-is-file", ["export-hf", ENTRY, "{file}"], "is a file"),
    ("export-hf-output-parent-is-file", ["export-hf", ENTRY, "{file}/hf"], "is a file, not a folder"),
    ("plot-output-is-directory", ["plot", "{good}", "--out", "{dir}"], "is a folder"),
    ("plot-output-parent-is-file", ["plot", "{good}", "--out", "{file}/p.png"], "is a file, not a folder"),
    ("eval-results-file-is-directory", EVAL + ["--results-file", "{dir}"], "is a directory"),
    ("eval-results-file-parent-is-file", EVAL + ["--results-file", "{file}/r.csv"], "is a file, not a folder"),
    ("pin-write-is-directory", ["pin", ENTRY, "{shipped}", "--write", "{dir}"], "is a directory"),
    ("pin-write-parent-is-file", ["pin", ENTRY, "{shipped}", "--write", "{file}/m.json"], "is a file, not a folder"),
    ("pin-write-into-non-manifest", ["pin", ENTRY, "{shipped}", "--write", "{file}"], "not valid JSON"),
    ("train-output-is-file", TRAIN_SMALL[:5] + ["{file}"], "is a file"),
    ("train-output-parent-is-file", TRAIN_SMALL[:5] + ["{file}/run", "--batch", "1x4"], "is a file, not a folder"),
    # too little data
    ("train-fewer-images-than-a-batch", TRAIN_SMALL, "lower --batch"),
    ("finetune-fewer-images-than-a-batch", FINETUNE, "lower --batch"),
    ("train-subset-smaller-than-a-batch", TRAIN_SMALL + ["--batch", "1x4", "--subset", "2"], "lower --batch"),
]


def _fill(args: list[str], paths: dict[str, Path], out: Path) -> list[str]:
    values = {name: str(path) for name, path in paths.items()}
    values["out"] = str(out)
    return [arg.format(**values) for arg in args]


def _tree(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in folder.rglob("*")}


def _cached_files() -> dict[str, bytes | None]:
    # Lock files are empty and harmless; weights, records and partial downloads are what must not appear.
    tree = _tree(cache_dir()) if cache_dir().is_dir() else {}
    return {k: v for k, v in tree.items() if not k.startswith(".locks")}


@pytest.mark.parametrize("args,expected", [pytest.param(a, e, id=i) for i, a, e in CASES])
def test_bad_input_is_one_error_line_and_leaves_nothing_behind(args, expected, inputs, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.chdir(out)  # where commands with a default output (plot's PNG) would write
    inputs_before = _tree(inputs["file"].parent)
    cache_before = _cached_files()

    result = CliRunner().invoke(cli, _fill(args, inputs, out))

    assert result.exit_code != 0, result.output
    # An uncaught exception reaches CliRunner as result.exception; an error line ends in SystemExit.
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = result.output.splitlines()
    ours = [line for line in lines if line.startswith("error: ")]
    usage = [line for line in lines if line.startswith("Error: ")]
    if result.exit_code == 2:  # click's usage error: one `Error:` line after the usage
        assert len(usage) == 1 and not ours, result.output
        line = usage[0]
    else:
        assert result.exit_code == 1 and len(ours) == 1 and not usage, result.output
        line = ours[0]
    assert expected in line, line
    assert list(out.iterdir()) == [], "output left behind"
    assert _tree(inputs["file"].parent) == inputs_before, "inputs changed or files written beside them"
    assert _cached_files() == cache_before, "weights cache changed"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only folders")
@pytest.mark.parametrize("args", [
    pytest.param(convert("{good}"), id="convert"),
    pytest.param(["export", "resnet20_sn", "{out}/m.onnx", "--size", "32"], id="export"),
    pytest.param(["plot", "{good}", "--out", "{out}/p.png"], id="plot"),
    pytest.param(["export-hf", ENTRY, "{out}/hf"], id="export-hf"),
    pytest.param(TRAIN_SMALL + ["--batch", "1x4"], id="train"),
])
def test_output_in_a_read_only_folder_is_one_error_line(args, inputs, tmp_path):
    out = tmp_path / "read-only"
    out.mkdir()
    out.chmod(0o555)
    try:
        result = CliRunner().invoke(cli, _fill(args, inputs, out))
    finally:
        out.chmod(0o755)
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "cannot write" in errors[0], result.output
    assert list(out.iterdir()) == []


def test_the_too_few_images_case_succeeds_with_a_smaller_batch(inputs, tmp_path):
    """The sweep's small folder fails only for its size: with a batch that fits, the same run trains."""
    result = CliRunner().invoke(cli, _fill(TRAIN_SMALL, inputs, tmp_path) + [
        "--batch", "1x4", "--max-steps", "1", "--epochs", "1", "-j", "0", "--val-subset", "2", "--set",
        "augmentation.crop=32"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "entry.json").is_file()
