"""`snzoo inspect` on the shipped Fashion-MNIST entry and on checkpoint files, and `snzoo finetune --reopen-ssn`."""

from __future__ import annotations

import json

import torch
from click.testing import CliRunner

from snzoo.nn import SparseSwitchNorm2d, SwitchNorm2d
from snzoo_cli.main import cli


def _invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


def test_inspect_shipped_entry_one_row_per_layer_probabilities_sum_to_one():
    result = _invoke("inspect", "resnet20_sn", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert len(rows) == 21 and rows[0]["layer"] == "sn1"
    for row in rows:
        assert row["terms"] == ["in", "ln", "bn"] and row["mean_fixed"] is None and row["radius"] is None
        for stat in ("mean", "var"):
            assert abs(sum(row[stat].values()) - 1) < 1e-6 and min(row[stat].values()) > 0
    table = _invoke("inspect", "resnet20_sn")
    assert table.exit_code == 0
    lines = table.output.strip().splitlines()
    assert len(lines) == 22 and lines[1].split()[0] == "sn1"
    assert [float(v) for v in lines[1].split()[1:7]] == [round(rows[0][s][t], 4) for s in ("mean", "var")
                                                         for t in ("in", "ln", "bn")]


def test_inspect_checkpoint_reports_ssn_flags_and_radius(tmp_path):
    model = torch.nn.Sequential(SwitchNorm2d(4, using_bn=False), SparseSwitchNorm2d(4))
    with torch.no_grad():
        model[1].mean_weight.copy_(torch.tensor([0.0, 0.0, 1.0]))
    model[1].mean_fixed.fill_(1)
    model[1].set_radius(0.5)
    path = tmp_path / "model.pth"
    torch.save({"state_dict": model.state_dict()}, path)
    result = _invoke("inspect", str(path), "--json")
    assert result.exit_code == 0, result.output
    first, second = json.loads(result.output)
    assert first["terms"] == ["in", "ln"] and first["mean"] == {"in": 0.5, "ln": 0.5}
    assert second["mean"] == {"in": 0.0, "ln": 0.0, "bn": 1.0} and second["mean_fixed"] is True
    assert second["var_fixed"] is False and second["radius"] == 0.5
    table = _invoke("inspect", str(path)).output.splitlines()
    assert table[1].split()[-2:] == ["-", "-"] and table[2].split()[-2:] == ["1/0", "0.5"]
    assert table[1].split()[3] == "-"  # no BN term


def test_inspect_bad_name_or_file_is_one_error_line(tmp_path):
    bad = tmp_path / "notes.pth"
    bad.write_text("not a checkpoint")
    for target in ("resnet20_nosuch", str(tmp_path / "missing.pth"), str(bad), "resnet20_bn"):
        result = _invoke("inspect", target)
        assert result.exit_code == 1
        assert len(result.output.strip().splitlines()) == 1 and result.output.startswith("error: "), result.output


def test_finetune_reopen_ssn_reaches_the_model(tmp_path):
    result = _invoke("finetune", "resnet20_sn.fmnist_8x2_cos2", "--data", "fashion-mnist", "-o", str(tmp_path / "ft"),
                     "--epochs", "1", "--max-steps", "1", "--batch", "1x8", "--subset", "8", "--val-subset", "8",
                     "-j", "0", "--reopen-ssn")
    assert result.exit_code == 0, result.output
    assert "--reopen-ssn: 0 Sparse SN layers had fixed one-hot importance weights" in result.output
