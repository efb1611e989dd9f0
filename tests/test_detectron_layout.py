"""Detectron.pytorch backbones (the SN detection release's layout): reading, writing, and fetching the zoo's two.

The detection layout is written here a second time, straight from the reference's description of the release's
tools/convert.py (module.conv1.* / module.sn1.* -> PREFIX + res1.*, module.layerK.* -> PREFIX + res{K+1}.*,
module.fc.* -> PREFIX + classifier.*), so the tests never check snzoo's table against itself.
"""

from __future__ import annotations

import importlib
import json
import re
import warnings

import pytest
import torch
from click.testing import CliRunner

import snzoo
from snzoo import zoo
from snzoo.errors import CheckpointError
from snzoo.tools.weights import convert_checkpoint
from snzoo.weights import UnpinnedWeightsWarning, fetch_weights, read_state_dict, write_safetensors
from snzoo_cli.main import cli
from http_server import make_tls_files, start_drive_server
from photos import photo_batch

pytestmark = pytest.mark.usefixtures("one_thread")

ARCH = "resnet50v1_sn"
PREFIXES = {False: "Conv_Body.", True: "Conv_Body.conv_body."}
ENTRIES = {True: "resnet50v1_sn.in1k_8x2_detectron", False: "resnet50v1_sn.in1k_8x1_detectron"}


def detectron_key(key: str, fpn: bool) -> str:
    """The release converter's rule, applied to a classification checkpoint key (which carried 'module.')."""
    prefix = PREFIXES[fpn]
    rest = "module." + key
    if m := re.fullmatch(r"module\.((?:conv1|sn1)\..+)", rest):
        return prefix + "res1." + m[1]
    if m := re.fullmatch(r"module\.layer(\d)\.(.+)", rest):
        return prefix + f"res{int(m[1]) + 1}." + m[2]
    if m := re.fullmatch(r"module\.fc\.(.+)", rest):
        return prefix + "classifier." + m[1]
    raise AssertionError(f"the release's converter has no rule for {key}")


def detectron_state_dict(model: torch.nn.Module, fpn: bool) -> dict[str, torch.Tensor]:
    return {detectron_key(k, fpn): v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module", params=[True, False], ids=["using_bn", "without_bn"])
def model(request):
    """A resnet50v1_sn with every SN tensor randomised (last_gamma's zero gammas too), in eval mode."""
    torch.manual_seed(1 if request.param else 2)
    net = snzoo.create_model(ARCH, using_bn=request.param)
    with torch.no_grad():
        for name, tensor in net.state_dict().items():
            if name.endswith(("mean_weight", "var_weight", "running_mean", ".bias")):
                tensor.normal_()
            elif name.endswith("running_var"):
                tensor.uniform_(0.5, 1.5)
            elif re.search(r"sn\d\.weight$|downsample\.1\.weight$", name):
                tensor.uniform_(0.5, 1.5)
    return net.eval()


@pytest.fixture(scope="module")
def photos():
    return photo_batch(224, count=3)


@pytest.fixture(scope="module")
def reference_outputs(model, photos, tmp_path_factory):
    """The model's logits, and the stage features of a trunk loaded from its weights in snzoo's own layout."""
    path = tmp_path_factory.mktemp("snzoo-layout") / "r50.safetensors"
    write_safetensors(model.state_dict(), path)
    trunk = snzoo.create_model(ARCH, checkpoint_path=path, using_bn=model.sn1.using_bn, features_only=True).eval()
    with torch.no_grad():
        return model(photos), trunk(photos)


def save(tmp_path, name: str, state_dict: dict) -> object:
    path = tmp_path / name
    torch.save({"model": state_dict}, path)
    return path


def assert_same_tensors(got: dict, expected: dict) -> None:
    assert sorted(got) == sorted(expected)  # safetensors files keep their keys sorted
    assert all(torch.equal(got[k], v) for k, v in expected.items())


@pytest.mark.parametrize("fpn", [False, True], ids=["plain", "fpn"])
def test_detection_layout_loads_with_identical_logits_and_features(model, photos, reference_outputs, tmp_path, fpn):
    using_bn = model.sn1.using_bn
    path = save(tmp_path, "r50.pth", detectron_state_dict(model, fpn))
    assert_same_tensors(read_state_dict(path), model.state_dict())
    loaded = snzoo.create_model(ENTRIES[using_bn], checkpoint_path=path).eval()
    assert loaded.sn1.using_bn is using_bn
    logits, features = reference_outputs
    with torch.no_grad():
        assert torch.equal(loaded(photos), logits)
    trunk = snzoo.create_model(ENTRIES[using_bn], checkpoint_path=path, features_only=True).eval()
    with torch.no_grad():
        got = trunk(photos)
    assert len(got) == len(features) == 5
    assert all(torch.equal(a, b) for a, b in zip(got, features))


def test_batch_average_scratch_buffers_are_dropped(model, tmp_path):
    state_dict = detectron_state_dict(model, fpn=True)
    # The detection SN registers these beside running_mean / running_var when using_moving_average is False.
    for layer in ("res1.sn1", "res2.0.sn1", "res5.2.downsample.1"):
        key = PREFIXES[True] + layer
        if key + ".weight" in state_dict:
            state_dict[key + ".batch_mean"] = torch.randn(1, state_dict[key + ".weight"].shape[1], 1)
            state_dict[key + ".batch_var"] = torch.rand(1, state_dict[key + ".weight"].shape[1], 1)
    assert_same_tensors(read_state_dict(save(tmp_path, "scratch.pth", state_dict)), model.state_dict())


@pytest.mark.parametrize("extra", ["Conv_Body.conv_body.fpn_inner1.weight", "RPN.RPN_conv.weight",
                                   "Conv_Body.res6.0.conv1.weight"])
def test_a_key_outside_the_mapping_is_one_clear_error(model, tmp_path, extra):
    state_dict = detectron_state_dict(model, fpn=True)
    state_dict[extra] = torch.zeros(3)
    with pytest.raises(CheckpointError) as info:
        read_state_dict(save(tmp_path, "extra.pth", state_dict))
    message = str(info.value)
    assert "\n" not in message and extra in message and "1 keys outside the Detectron.pytorch" in message
    assert str(tmp_path / "extra.pth") in message


def test_a_detectron_source_must_hold_detectron_keys(model, tmp_path):
    path = tmp_path / "plain.pth"
    torch.save({"state_dict": model.state_dict()}, path)
    with pytest.raises(CheckpointError, match=r"not a Detectron\.pytorch backbone") as info:
        read_state_dict(path, layout="detectron")
    assert "\n" not in str(info.value)
    assert_same_tensors(read_state_dict(path), model.state_dict())  # detection is automatic, not required


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.mark.parametrize("fpn", [False, True], ids=["plain", "fpn"])
def test_round_trip_through_the_detectron_layout(model, tmp_path, fpn):
    src = tmp_path / "mine.safetensors"
    write_safetensors(model.state_dict(), src)
    dst = tmp_path / "det.pth"
    result = run("convert", src, dst, "--arch", ARCH, "--to", "detectron", *(["--fpn"] if fpn else []), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["to"], report["fpn"]) == ("detectron", fpn) and report["size"] == dst.stat().st_size
    written = torch.load(dst, map_location="cpu", weights_only=True)
    assert list(written) == ["model"]
    assert sorted(written["model"]) == sorted(detectron_key(k, fpn) for k in model.state_dict())
    assert_same_tensors(read_state_dict(dst), model.state_dict())
    # ... and back to snzoo's canonical safetensors through the Python function.
    back = tmp_path / "back.safetensors"
    convert_checkpoint(dst, back, ARCH)
    assert_same_tensors(read_state_dict(back), model.state_dict())
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_convert_options_are_checked(model, tmp_path):
    src = tmp_path / "mine.safetensors"
    write_safetensors(model.state_dict(), src)
    fpn_alone = run("convert", src, tmp_path / "x.safetensors", "--arch", ARCH, "--fpn")
    assert fpn_alone.exit_code == 2 and "--fpn applies only to --to detectron" in fpn_alone.output
    v2 = snzoo.create_model("resnet18v2_sn")
    write_safetensors(v2.state_dict(), tmp_path / "v2.safetensors")
    bad = run("convert", tmp_path / "v2.safetensors", tmp_path / "v2.pth", "--arch", "resnet18v2_sn", "--to", "detectron")
    assert bad.exit_code == 1 and "sn_out" in bad.output and not (tmp_path / "v2.pth").exists()


# ------------------------------------------------------------------------------------- the zoo entries


def test_the_release_entries_validate_as_unpinned_drive_sources():
    for using_bn, name in ENTRIES.items():
        entry = zoo.get_entry(name)
        assert len(entry.sources) == 2 and entry.norm.using_bn is using_bn
        assert all(s.kind == "gdrive" and s.format == "detectron" and s.url.startswith("https://drive.google.com/uc?id=")
                   for s in entry.sources)
        assert all(s.sha256 is s.md5 is s.size is None for s in entry.sources)
        assert entry.metrics["imagenet-1k-val"] == zoo.Metrics(None, None)
        assert zoo.get_entry(ARCH).name != name


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.mark.parametrize("first_is_gone", [False, True], ids=["fpn_file", "plain_file_after_404"])
def test_fetching_an_entry_from_drive_converts_it_into_snzoo_keys(model, photos, reference_outputs, tls_files,
                                                                 tmp_path, monkeypatch, first_is_gone):
    name = ENTRIES[model.sn1.using_bn]
    entry = zoo.get_entry(name)
    served = tmp_path / "drive"
    served.mkdir()
    files = [s.file_name for s in entry.sources]
    torch.save({"model": detectron_state_dict(model, fpn=True)}, served / files[0])
    torch.save({"model": detectron_state_dict(model, fpn=False)}, served / files[1])
    monkeypatch.delenv("SNZOO_OFFLINE")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("SNZOO_DOWNLOAD_TIMEOUT", "5")
    with start_drive_server(served, tls_files) as drive:
        for key, value in drive.client_environment().items():
            monkeypatch.setenv(key, value)
        monkeypatch.setattr(importlib.import_module("gdown.download"), "DEFAULT_COOKIES_FILE",
                            str(tmp_path / "cookies.txt"))
        urls = [drive.share(f) for f in files]
        if first_is_gone:
            drive.set_fault(files[0], "404")
        # The shipped entry with its Drive ids replaced by the stand-in's; format, names and null checksums kept.
        sources = [{**s.to_dict(), "url": url} for s, url in zip(entry.sources, urls)]
        overlay = tmp_path / "overlay.json"
        overlay.write_text(json.dumps({"schema_version": 1, "entries": {name: {"sources": sources}}}))
        zoo.set_overlay(overlay)
        with pytest.warns(UnpinnedWeightsWarning, match=re.escape(files[int(first_is_gone)])):
            path = fetch_weights(zoo.get_entry(name))
    assert path.suffix == ".safetensors"
    assert_same_tensors(read_state_dict(path), model.state_dict())
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert f.metadata()["source_url"] == urls[int(first_is_gone)]
        assert sorted(f.keys()) == sorted(model.state_dict())  # snzoo's own keys in the cache
    monkeypatch.setenv("SNZOO_OFFLINE", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a cache hit: no fetch, so no unpinned warning either
        loaded = snzoo.create_model(name, pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(loaded(photos), reference_outputs[0])
