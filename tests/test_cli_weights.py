"""`snzoo download | verify | convert | pin | cache` over a real local HTTP server."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import snzoo
from snzoo import zoo
from snzoo.weights import read_state_dict
from snzoo.weights import cache_dir
from snzoo.weights.convert import read_record
from snzoo_cli.main import cli
from http_server import start_server
from test_fetch import ENTRY, FILE, entry_json


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    torch.manual_seed(1)
    model = snzoo.create_model("resnet18v1_sn", num_classes=10)
    directory = tmp_path_factory.mktemp("served")
    path = directory / FILE
    torch.save({"epoch": 1, "state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, path)
    with start_server(directory) as server:
        yield model, path, server


@pytest.fixture
def overlay(served, tmp_path, monkeypatch):
    monkeypatch.delenv("SNZOO_OFFLINE")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    _, path, server = served
    file = tmp_path / "overlay.json"
    sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    file.write_text(json.dumps({"schema_version": 1, "entries": {ENTRY: entry_json(server.url(FILE), sha256=sha256)}}))
    return file


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_download_then_verify_and_cache_listing(served, overlay):
    result = run("--manifest", overlay, "download", ENTRY, "--json", "--quiet")
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.output)
    path = Path(row["path"])
    assert path.parent == cache_dir() and path.name.startswith(ENTRY + "-")
    report = json.loads(run("--manifest", overlay, "verify", ENTRY, "--json").output)
    assert report["ok"] and report["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert report["pinned"] is True
    rows = json.loads(run("cache", "list", "--json").output)
    assert {r["kind"] for r in rows} == {"canonical", "record"}
    assert run("cache", "path").output.strip() == str(cache_dir())
    assert "removed 2 file(s)" in run("--manifest", overlay, "cache", "clean", ENTRY).output
    assert run("cache", "list", "--json").output.strip() == "[]"


def test_verify_detects_a_damaged_cached_file(served, overlay):
    assert run("--manifest", overlay, "download", ENTRY, "--quiet").exit_code == 0
    (path,) = cache_dir().glob("*.safetensors")
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    result = run("--manifest", overlay, "verify", ENTRY)
    assert result.exit_code == 1
    assert result.output.startswith("error: ") and "damaged" in result.output and result.output.count("\n") == 1


def test_verify_a_file_with_and_without_architecture(served):
    model, path, _ = served
    report = json.loads(run("verify", path, "--json").output)
    assert report["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() and report["tensors"] == len(model.state_dict())
    report = json.loads(run("verify", path, "--arch", "resnet18v1_sn", "--json").output)
    assert report["num_classes"] == 10
    wrong = run("verify", path, "--arch", "resnet34v1_sn")
    assert wrong.exit_code == 1 and "does not match resnet34v1_sn" in wrong.output


def test_convert_users_checkpoint_to_safetensors(served, tmp_path):
    model, path, _ = served
    dst = tmp_path / "mine.safetensors"
    result = run("convert", path, dst, "--arch", "resnet18v1_sn", "--json")
    assert result.exit_code == 0, result.output
    state_dict = read_state_dict(dst)
    assert all(torch.equal(state_dict[k], v) for k, v in model.state_dict().items())
    loaded = snzoo.create_model("resnet18v1_sn", checkpoint_path=dst, num_classes=10)
    assert torch.equal(loaded.fc.weight, model.fc.weight)
    bad = run("convert", path, tmp_path / "x.safetensors", "--arch", "resnet50v1_sn")
    assert bad.exit_code == 1 and not (tmp_path / "x.safetensors").exists()


def test_pin_prints_and_writes_into_an_overlay(served, tmp_path):
    _, path, server = served
    unpinned = tmp_path / "unpinned.json"
    unpinned.write_text(json.dumps({"schema_version": 1, "entries": {ENTRY: entry_json(server.url(FILE))}}))
    result = run("--manifest", unpinned, "pin", ENTRY, path, "--json")
    assert result.exit_code == 0, result.output
    pins = json.loads(result.output)
    assert pins["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert pins["md5"] == hashlib.md5(path.read_bytes()).hexdigest() and pins["size"] == path.stat().st_size
    assert run("--manifest", unpinned, "pin", ENTRY, path, "--write", unpinned).exit_code == 0
    source = json.loads(unpinned.read_text())["entries"][ENTRY]["sources"][0]
    assert (source["sha256"], source["md5"], source["size"]) == (pins["sha256"], pins["md5"], pins["size"])
    info = json.loads(run("--manifest", unpinned, "info", ENTRY, "--json").output)
    assert info["entry"]["sources"][0]["sha256"] == pins["sha256"]


def test_pin_refuses_a_file_that_contradicts_a_published_md5(served, tmp_path):
    _, path, server = served
    manifest = tmp_path / "md5.json"
    manifest.write_text(json.dumps({"schema_version": 1, "entries": {ENTRY: entry_json(server.url(FILE), md5="0" * 32)}}))
    result = run("--manifest", manifest, "pin", ENTRY, path, "--write", manifest)
    assert result.exit_code == 1 and "md5" in result.output
    assert json.loads(manifest.read_text())["entries"][ENTRY]["sources"][0]["sha256"] is None


def test_download_needs_a_name_and_reports_unknown_ones():
    assert run("download").exit_code == 2
    result = run("download", "resnet50v1_sn.in1k_nope")
    assert result.exit_code == 1 and "did you mean" in result.output


def test_offline_download_fails_with_instructions():
    result = run("download", "resnet50v1_ssn.in1k_8x8_step100")
    assert result.exit_code == 1
    assert "af85a39920644421fc48e216aba6ff0e" in result.output and str(cache_dir()) in result.output


def test_export_hf_writes_a_loadable_folder(served, overlay, tmp_path):
    model, _, _ = served
    out = tmp_path / "hf-folder"
    result = run("--manifest", overlay, "export-hf", ENTRY, out, "--repo-id", "snzoo/r18-test")
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json", "README.md"}
    assert "snzoo/r18-test" in (out / "README.md").read_text()
    loaded = snzoo.create_model(f"local-dir:{out}", pretrained=True)
    assert torch.equal(loaded.fc.weight, model.fc.weight)
    again = run("--manifest", overlay, "export-hf", ENTRY, out)
    assert again.exit_code == 1 and again.output.count("\n") == 1


def cached_kinds() -> dict[str, str]:
    """File name -> kind (canonical, record, partial, original) of everything in the cache."""
    return {r["file"]: r["kind"] for r in json.loads(run("cache", "list", "--json").stdout)}


def dead_link_overlay(tmp_path, sha256: str) -> Path:
    """The test entry, pinned, with a manifest source nobody answers: only --file or --source can get it."""
    file = tmp_path / "dead-link.json"
    file.write_text(json.dumps({"schema_version": 1, "entries": {
        ENTRY: entry_json("https://127.0.0.1:9/dead-link", sha256=sha256)}}))
    return file


def assert_cached_model(model, name: str = ENTRY) -> Path:
    (path,) = cache_dir().glob(f"{name}-*.safetensors")
    state_dict = read_state_dict(path)
    assert all(torch.equal(state_dict[k], v) for k, v in model.state_dict().items())
    return path


def test_cli_download_all_require_pinned_fetches_exactly_the_pinned_entries(served, tmp_path, monkeypatch):
    monkeypatch.delenv("SNZOO_OFFLINE")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    model, path, server = served
    sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    unpinned_entry = "resnet18v1_sn.test_unpinned"
    entries = {}
    for name in zoo.list_models(pretrained=True):
        sources = zoo.get_entry(name).sources
        if any(s.kind != "package" for s in sources):
            # The shipped links lead off this machine, and no file here has the SSN md5s: the overlay sends
            # these entries to the local server, unpinned, so any request for them would show.
            entries[name] = {"sources": [{**s.to_dict(), "url": server.url(f"shipped/{s.file_name}"), "kind": "https",
                                          "sha256": None, "md5": None} for s in sources]}
    entries[ENTRY] = entry_json(server.url(FILE), sha256=sha256)
    entries[unpinned_entry] = {**entry_json(server.url(FILE)), "default": False}
    overlay = tmp_path / "all.json"
    overlay.write_text(json.dumps({"schema_version": 1, "entries": entries}))
    zoo.set_overlay(overlay)
    pinned = sorted(n for n in zoo.list_models(pretrained=True)
                    if n not in entries or n == ENTRY)
    assert len(pinned) == 13  # the 12 shipped resnet20 entries and the test entry
    requests_before = len(server.requests)

    result = run("--manifest", overlay, "download", "--all", "--require-pinned", "--json", "--quiet")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["name"] for r in rows] == pinned
    skipped = sorted(set(entries) - {ENTRY})
    assert result.stderr == f"skipped {len(skipped)} entries without a published checksum: {', '.join(skipped)}\n"
    kinds = cached_kinds()
    assert sorted(kinds.values()) == ["canonical"] * 13 + ["record"] * 13
    assert {f.rsplit("-", 1)[0] for f in kinds} == set(pinned)
    assert {Path(r["path"]).name for r in rows} <= set(kinds)
    assert_cached_model(model)
    new_requests = server.requests[requests_before:]
    assert [r.path for r in new_requests] == [f"/{FILE}"]  # the pinned file once; nothing unpinned was asked for


def test_cli_download_file_installs_a_file_fetched_by_hand(served, tmp_path):
    # Offline (the tests' default): a file named on the command line needs no network.
    model, path, server = served
    overlay = dead_link_overlay(tmp_path, hashlib.sha256(path.read_bytes()).hexdigest())
    requests_before = len(server.requests)
    result = run("--manifest", overlay, "download", ENTRY, "--file", path, "--quiet")
    assert result.exit_code == 0, result.output
    cached = assert_cached_model(model)
    assert result.stdout.startswith(f"{ENTRY}: {cached} (") and result.stdout.count("\n") == 1
    assert cached_kinds() == {cached.name: "canonical", cached.name + ".json": "record"}
    assert path.is_file() and len(server.requests) == requests_before  # the user's file is read, not moved

    wrong = tmp_path / FILE
    wrong.write_bytes(path.read_bytes()[:-10] + b"0123456789")
    result = run("--manifest", overlay, "download", ENTRY, "--file", wrong, "--quiet")
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "does not match the pinned" in result.stderr and str(wrong) in result.stderr
    assert wrong.is_file() and cached_kinds() == {cached.name: "canonical", cached.name + ".json": "record"}

    missing = run("--manifest", overlay, "download", ENTRY, "--file", tmp_path / "nope.pth")
    assert missing.exit_code == 2 and "does not exist" in missing.stderr


def test_cli_download_source_replaces_the_manifest_sources(served, tmp_path, monkeypatch):
    monkeypatch.delenv("SNZOO_OFFLINE")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    model, path, server = served
    overlay = dead_link_overlay(tmp_path, hashlib.sha256(path.read_bytes()).hexdigest())
    requests_before = len(server.requests)
    result = run("--manifest", overlay, "download", ENTRY, "--source", server.url(FILE), "--json", "--quiet")
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)
    cached = assert_cached_model(model)
    assert row["path"] == str(cached) and read_record(cached)["source_url"] == server.url(FILE)
    assert [r.path for r in server.requests[requests_before:]] == [f"/{FILE}"]
    assert cached_kinds() == {cached.name: "canonical", cached.name + ".json": "record"}
    two = run("--manifest", overlay, "download", ENTRY, "resnet20_sn", "--source", server.url(FILE))
    assert two.exit_code == 2 and "one entry at a time" in two.stderr


def test_cli_cache_clean_partial_removes_only_interrupted_downloads(served, overlay):
    model, path, _ = served
    assert run("--manifest", overlay, "download", ENTRY, "--quiet").exit_code == 0
    cached = assert_cached_model(model)
    # What an interrupted download leaves beside its final place: the first bytes of the file.
    partial = cache_dir() / (FILE + ".part")
    partial.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert cached_kinds() == {cached.name: "canonical", cached.name + ".json": "record", partial.name: "partial"}
    result = run("cache", "clean", "--partial")
    assert result.exit_code == 0 and result.stdout == f"removed 1 file(s) from {cache_dir()}\n"
    assert cached_kinds() == {cached.name: "canonical", cached.name + ".json": "record"}
    assert run("--manifest", overlay, "verify", ENTRY).exit_code == 0
    assert run("cache", "clean", "--partial").stdout == f"removed 0 file(s) from {cache_dir()}\n"
