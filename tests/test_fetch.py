"""Fetching zoo weights end to end: a real HTTP server on 127.0.0.1, local files, a Hugging Face cache on disk.

Every fault must end in a correct canonical file or a clear error, and never leave a bad file under a final
name in the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import unquote

import pytest
import torch

import snzoo
from snzoo import zoo
from snzoo.weights import read_state_dict
from snzoo.errors import ManifestError, WeightsNotAvailableError
from snzoo.weights import UnpinnedWeightsWarning, cache_dir, cache_path, fetch_weights
from http_server import start_server
from photos import photo_batch

ENTRY = "resnet18v1_sn.test_http"
FILE = "ResNet18v1+SN-test.pth"
SNZOO = Path(sys.executable).with_name("snzoo")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A real checkpoint in the original release's format, and the model it came from."""
    torch.manual_seed(0)
    model = snzoo.create_model("resnet18v1_sn", num_classes=10)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith(("mean_weight", "var_weight", "running_mean")):
                tensor.normal_()
            if name.endswith("running_var"):
                tensor.uniform_(0.5, 1.5)
    directory = tmp_path_factory.mktemp("served")
    path = directory / FILE
    torch.save({"epoch": 100, "model": "resnet18", "best_prec1": 0.0,
                "state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, path)
    return model.eval(), path, hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def server(checkpoint):
    _, path, _ = checkpoint
    with start_server(path.parent) as srv:
        yield srv


def entry_json(url: str, kind: str = "https", sha256: str | None = None, md5: str | None = None,
               file_name: str = FILE) -> dict:
    base = zoo.get_entry("resnet50v1_sn.in1k_8x4_step100").to_dict()
    base.pop("name")
    base.update(architecture="resnet18v1_sn", default=True, num_classes=10, notes=[])
    base["metrics"] = {"imagenet-1k-val": {"top1": None, "top5": None}}
    base["sources"] = [{"url": url, "kind": kind, "format": "original", "file_name": file_name,
                        "sha256": sha256, "md5": md5, "size": None}]
    return base


@pytest.fixture
def use_entry(tmp_path, monkeypatch):
    """Install an overlay manifest with the test entry; downloads allowed (only to 127.0.0.1)."""
    monkeypatch.delenv("SNZOO_OFFLINE")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("SNZOO_DOWNLOAD_TIMEOUT", "5")

    def install(**kwargs) -> Path:
        overlay = tmp_path / "overlay.json"
        overlay.write_text(json.dumps({"schema_version": 1, "entries": {ENTRY: entry_json(**kwargs)}}))
        zoo.set_overlay(overlay)
        return overlay

    return install


def cache_names() -> set[str]:
    directory = cache_dir()
    return {p.name for p in directory.iterdir() if p.is_file()} if directory.is_dir() else set()


def assert_no_final_file_but_canonical():
    """Nothing but verified canonical files (with records) and partials may sit in the cache."""
    for name in cache_names():
        assert name.endswith((".safetensors", ".safetensors.json", ".part")), name


def assert_canonical_is(checkpoint, path: Path):
    model, _, sha256 = checkpoint
    assert path.name == f"{ENTRY}-{sha256[:8]}.safetensors"
    state_dict = read_state_dict(path)
    assert all(torch.equal(state_dict[k], v) for k, v in model.state_dict().items())
    assert not any(name.endswith(".part") for name in cache_names())


def test_download_verify_convert_over_http_then_cache_hit(checkpoint, server, use_entry):
    model, _, sha256 = checkpoint
    use_entry(url=server.url(FILE), sha256=sha256)
    path = fetch_weights(zoo.get_entry(ENTRY))
    assert_canonical_is(checkpoint, path)
    record = json.loads(path.with_name(path.name + ".json").read_text())
    assert record["source_sha256"] == sha256 and record["size"] == path.stat().st_size
    requests_before = len(server.requests)
    loaded = snzoo.create_model(ENTRY, pretrained=True).eval()
    assert len(server.requests) == requests_before  # a cache hit: no new request
    photos = photo_batch(224, count=3)
    with torch.no_grad():
        assert torch.equal(loaded(photos), model(photos))
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    assert metadata["entry"] == ENTRY and metadata["source_sha256"] == sha256
    assert metadata["snzoo_version"] == snzoo.__version__


def test_local_path_and_file_url_sources_work_offline(checkpoint, use_entry, monkeypatch):
    _, path, sha256 = checkpoint
    for url in (str(path), path.as_uri()):
        use_entry(url=url, kind="file", sha256=sha256)
        monkeypatch.setenv("SNZOO_OFFLINE", "1")
        assert_canonical_is(checkpoint, fetch_weights(zoo.get_entry(ENTRY)))
        for leftover in cache_dir().iterdir():
            if leftover.is_file():
                leftover.unlink()


def test_hf_hub_source_from_a_cache_on_disk_offline(checkpoint, use_entry, tmp_path, monkeypatch):
    _, path, sha256 = checkpoint
    hub_cache = tmp_path / "hf"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hub_cache / "models--snzoo--resnet18v1_sn-test"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / FILE).write_bytes(path.read_bytes())
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    # huggingface_hub reads HF_HUB_CACHE once, when first imported.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache))
    use_entry(url=f"hf-hub:snzoo/resnet18v1_sn-test@main/{FILE}", kind="hf-hub", sha256=sha256)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert_canonical_is(checkpoint, fetch_weights(zoo.get_entry(ENTRY)))


def test_body_truncated_on_every_attempt_is_one_clear_error_and_the_next_try_resumes(checkpoint, server, use_entry):
    _, path, sha256 = checkpoint
    use_entry(url=server.url(FILE), sha256=sha256)
    server.set_fault(FILE, "truncate")  # every answer announces its full length and sends half of it
    with pytest.raises(WeightsNotAvailableError) as info:
        fetch_weights(zoo.get_entry(ENTRY))
    # The first try and 4 retries, each asking only for bytes not yet on disk: at most what the server sent
    # before (the client may drop the last incomplete chunk), and more than the try before.
    size = path.stat().st_size
    ranges = [r.range for r in server.requests_for(FILE)]
    assert len(ranges) == 5 and ranges[0] is None and all((r or "").startswith("bytes=") for r in ranges[1:]), ranges
    offsets = [0] + [int(r[len("bytes="):-1]) for r in ranges[1:]]
    for before, after in zip(offsets, offsets[1:]):
        assert before < after <= before + (size - before) // 2
    partial = cache_path(FILE + ".part")
    assert partial.is_file(), "the bytes received must be kept for the next try"
    kept = partial.stat().st_size
    assert offsets[-1] < kept <= offsets[-1] + (size - offsets[-1]) // 2
    assert cache_names() == {partial.name} and partial.read_bytes() == path.read_bytes()[:kept]
    message = str(info.value)
    assert "\n" not in message and FILE in message and "after 5 attempts" in message
    assert f"the {kept} bytes in {partial} are kept" in message
    server.clear_faults()
    assert_canonical_is(checkpoint, fetch_weights(zoo.get_entry(ENTRY)))
    assert server.requests_for(FILE)[-1].range == f"bytes={kept}-"


def test_corrupted_bytes_fail_the_checksum_and_leave_nothing(checkpoint, server, use_entry):
    _, _, sha256 = checkpoint
    use_entry(url=server.url(FILE), sha256=sha256)
    server.set_fault(FILE, "corrupt")
    with pytest.raises(WeightsNotAvailableError, match=f"does not match the pinned {sha256}"):
        fetch_weights(zoo.get_entry(ENTRY))
    assert cache_names() == set()


def test_404_is_a_clear_error_without_retries(checkpoint, server, use_entry):
    use_entry(url=server.url(FILE), sha256=checkpoint[2])
    server.set_fault(FILE, "404")
    with pytest.raises(WeightsNotAvailableError, match="404 Not Found"):
        fetch_weights(zoo.get_entry(ENTRY))
    assert len(server.requests_for(FILE)) == 1
    assert cache_names() == set()


def test_server_error_then_success(checkpoint, server, use_entry):
    use_entry(url=server.url(FILE), sha256=checkpoint[2])
    server.set_fault(FILE, "500_then_ok", count=2)
    assert_canonical_is(checkpoint, fetch_weights(zoo.get_entry(ENTRY)))
    assert len(server.requests_for(FILE)) == 3


def test_connection_dropped_mid_file_resumes_with_range(checkpoint, server, use_entry):
    use_entry(url=server.url(FILE), sha256=checkpoint[2])
    server.set_fault(FILE, "drop_then_resume")
    assert_canonical_is(checkpoint, fetch_weights(zoo.get_entry(ENTRY)))
    requests = server.requests_for(FILE)
    assert len(requests) == 2 and requests[0].range is None and requests[1].range.startswith("bytes=")


def test_server_without_range_support_restarts_and_ends_correct(checkpoint, server, use_entry):
    use_entry(url=server.url(FILE), sha256=checkpoint[2])
    server.set_fault(FILE, "drop_then_resume", count=1)
    server.set_fault(FILE, "no_range")
    partial = cache_path(FILE + ".part")
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_bytes(b"stale bytes from an earlier attempt")
    assert_canonical_is(checkpoint, fetch_weights(zoo.get_entry(ENTRY)))


def test_stalled_server_times_out_with_a_clear_error(checkpoint, server, use_entry, monkeypatch):
    use_entry(url=server.url(FILE), sha256=checkpoint[2])
    monkeypatch.setenv("SNZOO_DOWNLOAD_TIMEOUT", "0.5")
    server.set_fault(FILE, "stall", stall_seconds=30)
    started = time.monotonic()
    with pytest.raises(WeightsNotAvailableError, match="timed out"):
        fetch_weights(zoo.get_entry(ENTRY))
    assert time.monotonic() - started < 25
    assert not any(n.endswith(".safetensors") for n in cache_names())


def test_html_page_instead_of_the_file_is_refused(checkpoint, server, use_entry):
    use_entry(url=server.url(FILE))  # unpinned: only the structural check stands between the page and the cache
    server.set_fault(FILE, "html")
    with pytest.raises(WeightsNotAvailableError, match="HTML page"):
        fetch_weights(zoo.get_entry(ENTRY))
    assert cache_names() == set()


def test_two_processes_fetching_the_same_entry(checkpoint, server, use_entry, tmp_path):
    overlay = use_entry(url=server.url(FILE), sha256=checkpoint[2])
    server.set_fault(FILE, "stall", count=1, stall_seconds=1.5)  # hold the first download while the second starts
    env = {**os.environ, "SNZOO_MANIFEST": str(overlay), "SNZOO_DOWNLOAD_TIMEOUT": "1"}
    procs = [subprocess.Popen([str(SNZOO), "download", ENTRY, "--json", "--quiet"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    paths = {json.loads(out)[0]["path"] for out, _ in outputs}
    assert len(paths) == 1
    assert_canonical_is(checkpoint, Path(paths.pop()))
    full_gets = [r for r in server.requests_for(FILE) if r.range is None]
    assert len(full_gets) == 1  # the second process waited for the first and reused its file


def test_cached_file_corrupted_after_download_is_detected_and_refetched(checkpoint, server, use_entry):
    use_entry(url=server.url(FILE), sha256=checkpoint[2])
    path = fetch_weights(zoo.get_entry(ENTRY))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="damaged"):
        again = fetch_weights(zoo.get_entry(ENTRY))
    assert_canonical_is(checkpoint, again)
    assert len(server.requests_for(FILE)) == 2


class _RunsCode:
    def __reduce__(self):
        return (os.mkdir, (os.environ["SNZOO_TEST_MARKER"],))


def test_pickle_carrying_code_is_refused_without_running(server, use_entry, tmp_path, monkeypatch):
    marker = tmp_path / "code-ran"
    monkeypatch.setenv("SNZOO_TEST_MARKER", str(marker))
    evil = Path(server.directory) / "evil.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "x": _RunsCode()}, evil)
    use_entry(url=server.url("evil.pth"), file_name="evil.pth")
    with pytest.raises(WeightsNotAvailableError, match="refused"):
        fetch_weights(zoo.get_entry(ENTRY))
    assert not marker.exists()
    assert cache_names() == set()


def test_file_name_escaping_the_cache_is_rejected(tmp_path):
    overlay = tmp_path / "escape.json"
    overlay.write_text(json.dumps({"schema_version": 1, "entries": {ENTRY: entry_json("https://127.0.0.1/x", file_name="../x.pth")}}))
    with pytest.raises(ManifestError, match="file_name"):
        zoo.set_overlay(overlay)
    with pytest.raises(ManifestError, match="escape"):
        cache_path("../x.pth")


def test_unpinned_download_warns_with_the_digest_and_require_pinned_refuses(checkpoint, server, use_entry, monkeypatch):
    use_entry(url=server.url(FILE))
    monkeypatch.setenv("SNZOO_REQUIRE_PINNED", "1")
    with pytest.raises(WeightsNotAvailableError, match="pinned checksums are required"):
        fetch_weights(zoo.get_entry(ENTRY))
    assert server.requests_for(FILE) == []  # refused before any byte was fetched
    monkeypatch.delenv("SNZOO_REQUIRE_PINNED")
    with pytest.warns(UnpinnedWeightsWarning, match=checkpoint[2]):
        assert_canonical_is(checkpoint, fetch_weights(zoo.get_entry(ENTRY)))


def test_offline_error_names_the_entry_cache_path_and_checksum(checkpoint, use_entry, monkeypatch):
    sha256 = checkpoint[2]
    use_entry(url="https://127.0.0.1:9/never", sha256=sha256)
    monkeypatch.setenv("SNZOO_OFFLINE", "1")
    with pytest.raises(WeightsNotAvailableError) as info:
        fetch_weights(zoo.get_entry(ENTRY))
    message = str(info.value)
    assert ENTRY in message and str(cache_path(FILE)) in message and sha256 in message
    cache_path(FILE).write_bytes(checkpoint[1].read_bytes())  # do what the message says
    assert_canonical_is(checkpoint, fetch_weights(zoo.get_entry(ENTRY)))


def serve_mirror(checkpoint, server, use_entry, monkeypatch) -> None:
    """The entry's file on a mirror of the test server (SNZOO_MIRROR), the entry pointing at the server."""
    _, path, sha256 = checkpoint
    mirror_dir = Path(server.directory) / "mirror"
    mirror_dir.mkdir(exist_ok=True)
    (mirror_dir / FILE).write_bytes(path.read_bytes())
    use_entry(url=server.url(FILE), sha256=sha256)
    monkeypatch.setenv("SNZOO_MIRROR", server.url("mirror"))


def test_mirror_is_tried_first(checkpoint, server, use_entry, monkeypatch):
    serve_mirror(checkpoint, server, use_entry, monkeypatch)
    assert_canonical_is(checkpoint, fetch_weights(zoo.get_entry(ENTRY)))
    assert server.requests and all(unquote(r.path) == f"/mirror/{FILE}" for r in server.requests)


def test_offline_never_reaches_a_network_mirror(checkpoint, server, use_entry, monkeypatch):
    serve_mirror(checkpoint, server, use_entry, monkeypatch)
    monkeypatch.setenv("SNZOO_OFFLINE", "1")
    with pytest.raises(WeightsNotAvailableError, match="offline"):
        fetch_weights(zoo.get_entry(ENTRY))
    assert server.requests == []  # neither the mirror nor the source was asked


def test_source_override_and_manual_file(checkpoint, server, use_entry, tmp_path):
    _, path, sha256 = checkpoint
    use_entry(url="https://127.0.0.1:9/dead-link", sha256=sha256)
    assert_canonical_is(checkpoint, fetch_weights(zoo.get_entry(ENTRY), source_url=server.url(FILE)))
    for leftover in cache_dir().iterdir():
        leftover.unlink() if leftover.is_file() else None
    assert_canonical_is(checkpoint, fetch_weights(zoo.get_entry(ENTRY), file=path))
    wrong = tmp_path / "wrong.pth"
    wrong.write_bytes(path.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(Exception, match="sha256"):
        fetch_weights(zoo.get_entry(ENTRY), file=wrong)


def test_md5_only_pin_verifies_like_the_published_ssn_files(checkpoint, server, use_entry, recwarn):
    _, path, _ = checkpoint
    md5 = hashlib.md5(path.read_bytes()).hexdigest()
    use_entry(url=server.url(FILE), md5=md5.upper())
    assert_canonical_is(checkpoint, fetch_weights(zoo.get_entry(ENTRY)))
    assert not [w for w in recwarn if issubclass(w.category, UnpinnedWeightsWarning)]
    for leftover in cache_dir().iterdir():
        leftover.unlink() if leftover.is_file() else None
    use_entry(url=server.url(FILE), md5="0" * 32)
    with pytest.raises(WeightsNotAvailableError, match="md5"):
        fetch_weights(zoo.get_entry(ENTRY))
    assert cache_names() == set()

