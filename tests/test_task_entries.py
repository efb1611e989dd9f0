"""Task entries in the manifest: the same checks and one-line errors as classification entries."""

import json

import pytest

from snzoo import zoo
from snzoo.errors import CheckpointError, ManifestError, UnknownModelError
from snzoo.tasks import get_task_entry, list_task_entries, read_task_entry

NAME = "fasterrcnn_resnet_fpn_sn.scenes_1x2_step40it"


def task_entry(**changes) -> dict:
    entry = {
        "task": "detection", "model": "fasterrcnn_resnet_fpn_sn",
        "model_kwargs": {"num_classes": 11, "trainable_layers": 3, "using_bn": True},
        "backbone": "resnet18v1_sn.scenes_1x8_test", "backbone_architecture": "resnet18v1_sn", "num_classes": 11,
        "classes": [str(i) for i in range(11)],
        "sources": [{"url": "file:///nowhere/w.safetensors", "kind": "file", "format": "safetensors",
                     "file_name": "w.safetensors", "sha256": "0" * 64, "md5": None, "size": None}],
        "metrics": {"scenes-val": {"box": {"AP": 1.0}}}, "eval": {"dataset": "scenes-val"}, "recipe": {},
        "provenance": {"paper": "arXiv:1806.10779", "repository": "snzoo", "license": "Apache-2.0"},
    }
    entry.update(changes)
    return entry


def overlay(tmp_path, entries: dict):
    path = tmp_path / "entry.json"
    path.write_text(json.dumps({"schema_version": 1, "entries": {}, "task_entries": entries}))
    return path


def test_a_task_entry_joins_the_zoo_through_an_overlay(tmp_path):
    path = overlay(tmp_path, {NAME: task_entry()})
    zoo.set_overlay(path)
    assert list_task_entries(task="detection") == [NAME] and list_task_entries(task="segmentation") == []
    assert list_task_entries("fasterrcnn*") == [NAME] and list_task_entries("deeplab*") == []
    assert get_task_entry(NAME)["backbone_architecture"] == "resnet18v1_sn"
    assert zoo.list_models(pretrained=True) == zoo.load_manifest().list_entries()  # classification untouched
    name, entry, folder = read_task_entry(path)
    assert name == NAME and folder == tmp_path and entry["num_classes"] == 11
    with pytest.raises(UnknownModelError, match="unknown task entry 'fasterrcnn_resnet_fpn_sn.scenes_1x2'"):
        get_task_entry("fasterrcnn_resnet_fpn_sn.scenes_1x2")


@pytest.mark.parametrize("changes, message", [
    ({"model": "maskrcnn_resnet_fpn_sn"}, "field 'model': 'maskrcnn_resnet_fpn_sn' is not valid (expected "
                                          "'fasterrcnn_resnet_fpn_sn'"),
    ({"backbone_architecture": "resnet19v1_sn"}, "field 'backbone_architecture': unknown architecture"),
    ({"num_classes": 12}, "field 'model_kwargs.num_classes': 11 is not valid (expected 12"),
    ({"task": "tracking"}, "field 'task': 'tracking' is not valid"),
    ({"classes": None}, "field 'classes'"),
])
def test_bad_task_entries_are_one_line_naming_the_field(tmp_path, changes, message):
    path = overlay(tmp_path, {NAME: task_entry(**changes)})
    with pytest.raises(ManifestError) as info:
        zoo.load_manifest(overlay=path)
    text = str(info.value)
    assert f"entry '{NAME}'" in text and message in text and "\n" not in text, text


def test_a_missing_field_and_a_bad_name_are_named(tmp_path):
    entry = task_entry()
    del entry["sources"]
    with pytest.raises(ManifestError, match=f"entry '{NAME}', field 'sources' is missing"):
        zoo.load_manifest(overlay=overlay(tmp_path, {NAME: entry}))
    with pytest.raises(ManifestError, match="entry name 'Faster.x' is not valid"):
        zoo.load_manifest(overlay=overlay(tmp_path, {"Faster.x": task_entry()}))


def test_a_classification_entry_file_is_not_a_task_entry(tmp_path):
    path = tmp_path / "entry.json"
    path.write_text(json.dumps({"schema_version": 1, "entries": {}}))
    with pytest.raises(CheckpointError, match="one entry under 'task_entries'"):
        read_task_entry(path)
    with pytest.raises(CheckpointError, match="no task entry there"):
        read_task_entry(tmp_path / "missing")


def test_info_and_list_show_a_task_entry(tmp_path):
    from click.testing import CliRunner

    from snzoo_cli.main import cli

    path = overlay(tmp_path, {NAME: task_entry()})
    listed = CliRunner().invoke(cli, ["--manifest", str(path), "list", "--task", "detection", "--json"])
    assert listed.exit_code == 0 and json.loads(listed.stdout)[0]["name"] == NAME
    shown = CliRunner().invoke(cli, ["--manifest", str(path), "info", NAME])
    assert shown.exit_code == 0, shown.output
    assert "detection: fasterrcnn_resnet_fpn_sn" in shown.stdout and "resnet18v1_sn.scenes_1x8_test" in shown.stdout
    as_json = CliRunner().invoke(cli, ["--manifest", str(path), "info", NAME, "--json"])
    assert json.loads(as_json.stdout)["backbone_architecture"] == "resnet18v1_sn"
