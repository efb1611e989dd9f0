"""The `snzoo` command: list and info, JSON output, one-line errors and exit codes."""

import json
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from snzoo.models import list_architectures
from snzoo_cli.main import cli

SNZOO = Path(sys.executable).with_name("snzoo")


def run(*args, env=None):
    return CliRunner().invoke(cli, list(args), env=env)


def test_list_architectures_and_patterns():
    result = run("list")
    assert result.exit_code == 0
    assert result.output.split() == list_architectures()
    result = run("list", "resnet50v*_sn", "--json")
    assert json.loads(result.output) == ["resnet50v1_sn", "resnet50v2_sn"]


def test_list_pretrained_json_carries_metrics_and_defaults():
    rows = json.loads(run("list", "resnet50v1_sn", "--pretrained", "--json").output)
    by_name = {row["name"]: row for row in rows}
    assert set(by_name) == {
        "resnet50v1_sn.in1k_8x32_cos120", "resnet50v1_sn.in1k_8x32_step100",
        "resnet50v1_sn.in1k_8x4_step100", "resnet50v1_sn.in1k_8x1_step100",
        # the detection release's backbones: no accuracy was published for them
        "resnet50v1_sn.in1k_8x2_detectron", "resnet50v1_sn.in1k_8x1_detectron",
    }
    assert by_name["resnet50v1_sn.in1k_8x2_detectron"]["top1"] is None
    assert by_name["resnet50v1_sn.in1k_8x32_cos120"]["default"] is True
    assert by_name["resnet50v1_sn.in1k_8x4_step100"]["top1"] == 75.85


def test_info_json_reports_architecture_entry_and_cache(tmp_path):
    result = run("info", "resnet50v1_sn.in1k_8x1_step100", "--json", env={"SNZOO_CACHE": str(tmp_path)})
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["param_count"] == 25_557_244 and info["state_dict_keys"] == 267  # using_bn=False
    assert info["entry"]["norm"]["using_bn"] is False
    assert info["entry"]["sources"][0]["url"].endswith("1-y8dDn19Hx02efy4Z5ZRihggYHTYvqkc")
    assert info["cache_dir"] == str(tmp_path)


def test_info_text_for_architecture_without_weights():
    result = run("info", "resnet18v2_gn")
    assert result.exit_code == 0
    assert "none published" in result.output and "resnet18v2_gn" in result.output


def test_unknown_name_is_one_line_with_suggestions():
    result = run("info", "resnet50v1_sm")
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown")
    assert "resnet50v1_sn" in lines[0]


def test_bad_overlay_manifest_fails_with_one_line(tmp_path):
    overlay = tmp_path / "overlay.json"
    overlay.write_text(json.dumps({"schema_version": 1, "entries": {"resnet50v1_sn.in1k_8x32_cos120": {"num_classes": "many"}}}))
    result = run("--manifest", str(overlay), "list", "--pretrained")
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "num_classes" in lines[0] and "overlay.json" in lines[0]


def test_overlay_adds_an_entry_visible_in_list(tmp_path):
    entry = json.loads(run("info", "resnet50v1_sn.in1k_8x4_step100", "--json").output)["entry"]
    entry.pop("name")
    entry["default"] = False
    overlay = tmp_path / "mine.json"
    overlay.write_text(json.dumps({"schema_version": 1, "entries": {"resnet50v1_sn.in1k_8x4_mine": entry}}))
    result = run("--manifest", str(overlay), "list", "resnet50v1_sn", "--pretrained", "--json")
    assert "resnet50v1_sn.in1k_8x4_mine" in [row["name"] for row in json.loads(result.output)]


def test_console_script_and_python_m_start_the_cli():
    for command in ([str(SNZOO)], [sys.executable, "-m", "snzoo"]):
        ok = subprocess.run(command + ["list", "resnet101*"], capture_output=True, text=True, timeout=120)
        assert ok.returncode == 0 and "resnet101v2_sn" in ok.stdout.split()
        bad = subprocess.run(command + ["info", "nope"], capture_output=True, text=True, timeout=120)
        assert bad.returncode == 1
        assert len(bad.stderr.strip().splitlines()) == 1 and bad.stderr.startswith("error: unknown")
        assert "Traceback" not in bad.stderr
