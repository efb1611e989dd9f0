"""The download engine against a real HTTP server on 127.0.0.1 that misbehaves on request."""

import hashlib
import threading
import time
from pathlib import Path

import pytest
import requests
import torch
from http_server import start_server

import snzoo
from snzoo.errors import SnzooError
from snzoo.nn import SwitchNorm2d
from snzoo.weights.download import (
    Digests,
    DownloadError,
    download_to_partial,
    hash_file,
)

NAME = "/tiny_sn.pth"
FAST = {"backoff": 0.01, "progress": False}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A real torch checkpoint of about 1 MB, large enough that a connection can drop mid-file."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 64, 3),
        SwitchNorm2d(64),
        torch.nn.Conv2d(64, 128, 3),
        torch.nn.Linear(512, 256),
    )
    directory = tmp_path_factory.mktemp("served")
    path = directory / NAME.lstrip("/")
    torch.save(model.state_dict(), path)
    assert 300_000 < path.stat().st_size < 2_000_000
    return path


@pytest.fixture(scope="module")
def real(checkpoint) -> Digests:
    data = checkpoint.read_bytes()
    return Digests(hashlib.sha256(data).hexdigest(), hashlib.md5(data).hexdigest(), len(data))


@pytest.fixture
def server(checkpoint):
    srv = start_server(checkpoint.parent)
    yield srv
    srv.close()


@pytest.fixture
def partial(tmp_path) -> Path:
    return tmp_path / "cache" / "tiny_sn.pth.partial"


def gets(server):
    return [r for r in server.requests_for(NAME) if r.method == "GET"]


def test_hash_file_matches_hashlib(checkpoint, real):
    assert hash_file(checkpoint) == real


def test_plain_download_has_the_real_digests_and_loads(server, partial, checkpoint, real):
    digests = download_to_partial(server.url(NAME), partial, expected_size=real.size, **FAST)
    assert digests == real
    assert hash_file(partial) == real
    loaded = torch.load(partial, weights_only=True)
    original = torch.load(checkpoint, weights_only=True)
    assert loaded.keys() == original.keys()
    assert all(torch.equal(loaded[k], original[k]) for k in original)
    (request,) = gets(server)
    assert request.range is None
    assert request.headers["User-Agent"] == f"snzoo/{snzoo.__version__}"


def test_truncated_once_is_resumed_with_range(server, partial, real):
    server.set_fault(NAME, "truncate", count=1)
    assert download_to_partial(server.url(NAME), partial, **FAST) == real
    first, second = gets(server)
    assert first.range is None
    # Resumes from what reached the disk: at most the half the server sent.
    resumed_at = int(second.range.removeprefix("bytes=").removesuffix("-"))
    assert 0 < resumed_at <= real.size // 2


def test_always_truncated_fails_clearly_and_keeps_the_partial(server, partial, real):
    server.set_fault(NAME, "truncate")
    with pytest.raises(DownloadError) as info:
        download_to_partial(server.url(NAME), partial, retries=2, **FAST)
    message = str(info.value)
    assert "\n" not in message
    assert server.url(NAME) in message and "3 attempts" in message and "connection dropped" in message
    assert len(gets(server)) == 3
    # Kept so a later call can resume; its bytes are a true prefix of the file.
    kept = partial.read_bytes()
    assert 0 < len(kept) < real.size
    server.clear_faults()
    assert download_to_partial(server.url(NAME), partial, **FAST) == real
    assert gets(server)[-1].range == f"bytes={len(kept)}-"


def test_corrupted_body_gives_digests_that_are_not_the_real_ones(server, partial, real):
    server.set_fault(NAME, "corrupt")
    digests = download_to_partial(server.url(NAME), partial, expected_size=real.size, **FAST)
    assert digests.size == real.size
    assert digests.sha256 != real.sha256 and digests.md5 != real.md5
    assert hash_file(partial) == digests


def test_404_fails_at_once_in_one_line(server, partial):
    server.set_fault(NAME, "404")
    url = server.url(NAME)
    with pytest.raises(DownloadError) as info:
        download_to_partial(url, partial, retries=4, **FAST)
    assert str(info.value) == (
        f"HTTP 404 Not Found from {url}: the file is not there; check the URL or use another source"
    )
    assert isinstance(info.value, SnzooError)
    assert len(gets(server)) == 1


def test_missing_file_is_a_404_too(server, partial):
    with pytest.raises(DownloadError, match="HTTP 404"):
        download_to_partial(server.url("/nope.pth"), partial, **FAST)


def test_500_then_ok_is_retried(server, partial, real):
    server.set_fault(NAME, "500_then_ok", count=2)
    assert download_to_partial(server.url(NAME), partial, retries=2, **FAST) == real
    assert len(gets(server)) == 3


def test_500_for_longer_than_the_retries_names_the_cause(server, partial):
    server.set_fault(NAME, "500_then_ok", count=10)
    with pytest.raises(DownloadError, match=r"after 2 attempts: HTTP 500 Internal Server Error"):
        download_to_partial(server.url(NAME), partial, retries=1, **FAST)
    assert len(gets(server)) == 2


def test_dropped_connection_is_resumed_with_range(server, partial, real):
    server.set_fault(NAME, "drop_then_resume")
    assert download_to_partial(server.url(NAME), partial, **FAST) == real
    requests_seen = gets(server)
    assert len(requests_seen) == 2
    assert requests_seen[0].range is None
    assert requests_seen[1].range is not None and requests_seen[1].range.startswith("bytes=")
    assert requests_seen[1].range != "bytes=0-"


def test_server_without_range_support_restarts_from_zero(server, partial, real, checkpoint):
    partial.parent.mkdir(parents=True)
    partial.write_bytes(checkpoint.read_bytes()[:1000])
    server.set_fault(NAME, "no_range")
    assert download_to_partial(server.url(NAME), partial, **FAST) == real
    (request,) = gets(server)
    assert request.range == "bytes=1000-"
    assert hash_file(partial) == real


def test_drop_then_no_range_restarts_and_ends_correct(server, partial, real):
    server.set_fault(NAME, "truncate", count=1)
    with pytest.raises(DownloadError):
        download_to_partial(server.url(NAME), partial, retries=0, **FAST)
    server.set_fault(NAME, "no_range")
    assert download_to_partial(server.url(NAME), partial, **FAST) == real


def test_resume_answered_with_another_range_restarts_from_zero(server, partial, real, checkpoint):
    partial.parent.mkdir(parents=True)
    partial.write_bytes(checkpoint.read_bytes()[:5000])
    server.set_fault(NAME, "shifted_range", count=1)
    assert download_to_partial(server.url(NAME), partial, **FAST) == real
    assert [r.range for r in gets(server)] == ["bytes=5000-", None]


def test_server_that_cannot_send_the_start_drops_the_partial(server, partial, checkpoint):
    partial.parent.mkdir(parents=True)
    partial.write_bytes(checkpoint.read_bytes()[:5000])
    server.set_fault(NAME, "shifted_range")
    with pytest.raises(DownloadError, match="cannot be fetched from its start.*was deleted"):
        download_to_partial(server.url(NAME), partial, retries=3, **FAST)
    assert not partial.exists()
    assert [r.range for r in gets(server)] == ["bytes=5000-", None]


def test_existing_partial_is_resumed(server, partial, real, checkpoint):
    partial.parent.mkdir(parents=True)
    partial.write_bytes(checkpoint.read_bytes()[:123_457])
    assert download_to_partial(server.url(NAME), partial, expected_size=real.size, **FAST) == real
    (request,) = gets(server)
    assert request.range == "bytes=123457-"


def test_complete_partial_answered_416_counts_as_done(server, partial, real, checkpoint):
    partial.parent.mkdir(parents=True)
    partial.write_bytes(checkpoint.read_bytes())
    assert download_to_partial(server.url(NAME), partial, expected_size=real.size, **FAST) == real
    # Without an expected size the 416's Content-Range total vouches for it.
    assert download_to_partial(server.url(NAME), partial, **FAST) == real
    assert [r.range for r in gets(server)] == [f"bytes={real.size}-"] * 2


def test_partial_longer_than_the_file_restarts(server, partial, real, checkpoint):
    partial.parent.mkdir(parents=True)
    partial.write_bytes(checkpoint.read_bytes() + b"junk")
    assert download_to_partial(server.url(NAME), partial, **FAST) == real
    assert [r.range for r in gets(server)] == [f"bytes={real.size + 4}-", None]


def test_expected_size_mismatch_fails_and_drops_the_partial(server, partial, real):
    with pytest.raises(DownloadError) as info:
        download_to_partial(server.url(NAME), partial, expected_size=real.size + 1, **FAST)
    message = str(info.value)
    assert "\n" not in message
    assert f"serves {real.size} bytes but {real.size + 1} are expected" in message
    assert not partial.exists()


def test_stall_times_out_within_bounds(server, partial):
    server.set_fault(NAME, "stall")
    started = time.monotonic()
    with pytest.raises(DownloadError) as info:
        download_to_partial(server.url(NAME), partial, timeout=1, retries=1, **FAST)
    elapsed = time.monotonic() - started
    assert "after 2 attempts: timed out after 1 s without data" in str(info.value)
    assert elapsed < 6
    assert partial.stat().st_size > 0  # what arrived before the stall is kept for a resume
    first, second = gets(server)
    assert first.range is None and second.range.startswith("bytes=") and second.range != "bytes=0-"


def test_html_page_instead_of_the_file_is_refused(server, partial):
    server.set_fault(NAME, "html")
    with pytest.raises(DownloadError, match="HTML page instead of the file"):
        download_to_partial(server.url(NAME), partial, retries=3, **FAST)
    assert len(gets(server)) == 1


def test_refused_connection_is_retried_then_reported(checkpoint, partial):
    closed = start_server(checkpoint.parent)
    url = closed.url(NAME)
    closed.close()
    with pytest.raises(DownloadError, match=r"after 2 attempts: connection failed: .*refused"):
        download_to_partial(url, partial, retries=1, **FAST)


def test_bad_url_is_refused_before_any_request(partial):
    with pytest.raises(DownloadError, match="is not an http"):
        download_to_partial("ftp://127.0.0.1/x.pth", partial, **FAST)


def test_progress_bar_only_when_asked(server, partial, real, capsys):
    download_to_partial(server.url(NAME), partial, progress=False, backoff=0.01)
    assert capsys.readouterr().err == ""
    partial.unlink()
    download_to_partial(server.url(NAME), partial, progress=True, backoff=0.01)
    assert "tiny_sn.pth" in capsys.readouterr().err


def test_given_session_is_used_and_left_open(server, partial, real):
    with requests.Session() as session:
        session.headers["X-Test"] = "yes"
        assert download_to_partial(server.url(NAME), partial, session=session, **FAST) == real
        assert gets(server)[0].headers["X-Test"] == "yes"
        assert session.get(server.url(NAME), timeout=5).status_code == 200


def test_server_closes_quickly_while_a_client_is_stalled(checkpoint):
    srv = start_server(checkpoint.parent)
    srv.set_fault(NAME, "stall", stall_seconds=60)
    received = []

    def client():
        try:
            with requests.get(srv.url(NAME), stream=True, timeout=30) as resp:
                for chunk in resp.iter_content(1 << 16):
                    received.append(len(chunk))
        except requests.RequestException:
            pass

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    deadline = time.monotonic() + 5
    while not received and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    srv.close()
    assert time.monotonic() - started < 2
    thread.join(5)
    assert not thread.is_alive()
