"""Google Drive sources through gdown, against Drive's two hosts played by a proxy on 127.0.0.1.

gdown turns every Drive link into https://drive.google.com/uc?id=ID, so the test cannot hand it a local URL:
requests sends it through HTTPS_PROXY to the server in http_server.py, which ends the TLS with a certificate
of a CA made for the test (REQUESTS_CA_BUNDLE) and answers as Drive does, virus scan warning page included.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from click.testing import CliRunner

from snzoo import zoo
from snzoo.errors import WeightsNotAvailableError
from snzoo.weights import fetch_weights
from snzoo.weights.convert import read_record
from snzoo_cli.main import cli
from http_server import DRIVE_CONTENT_HOST, DRIVE_HOST, make_tls_files, start_drive_server
from test_fetch import ENTRY, FILE, assert_canonical_is, cache_names, checkpoint, use_entry  # noqa: F401 (fixtures)

GDOWN_USER_AGENT = "Mozilla/5.0"


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def drive(checkpoint, tls_files, tmp_path, monkeypatch):
    """Drive sharing the checkpoint's directory; requests in this process reach it through its proxy."""
    _, path, _ = checkpoint
    with start_drive_server(path.parent, tls_files) as server:
        for name, value in server.client_environment().items():
            monkeypatch.setenv(name, value)
        # Every Drive request must go to the proxy on 127.0.0.1, never out to Google.
        for host in (DRIVE_HOST, DRIVE_CONTENT_HOST):
            assert requests.utils.get_environ_proxies(f"https://{host}/uc")["https"] == server.proxy_url
        # gdown keeps a cookie jar in the home directory; the test's belongs in its own.
        monkeypatch.setattr(importlib.import_module("gdown.download"), "DEFAULT_COOKIES_FILE", str(tmp_path / "cookies.txt"))
        yield server


def drive_gets(server) -> list[tuple[str, str, dict]]:
    """(host, path, query) of each GET the Drive hosts received, oldest first."""
    return [(r.host, r.path, parse_qs(r.query)) for r in server.requests if r.method == "GET"]


def assert_sent_by_gdown(server) -> None:
    gets = [r for r in server.requests if r.method == "GET"]
    assert gets and all(r.headers.get("User-Agent", "").startswith(GDOWN_USER_AGENT) for r in gets), \
        [r.headers.get("User-Agent") for r in gets]


def test_drive_link_is_fetched_by_gdown_and_verified_into_the_cache(checkpoint, drive, use_entry):
    _, _, sha256 = checkpoint
    url = drive.share(FILE)
    file_id = parse_qs(urlsplit(url).query)["id"][0]
    use_entry(url=url, kind="gdrive", sha256=sha256)
    path = fetch_weights(zoo.get_entry(ENTRY))
    assert_canonical_is(checkpoint, path)
    assert cache_names() == {path.name, path.name + ".json"}  # no partial or gdown temporary left
    assert read_record(path)["source_url"] == url
    assert drive_gets(drive) == [(DRIVE_HOST, "/uc", {"id": [file_id]}),
                                 (DRIVE_CONTENT_HOST, "/download", {"id": [file_id], "export": ["download"]})]
    assert_sent_by_gdown(drive)


def test_drive_virus_scan_warning_is_confirmed_with_the_page_token(checkpoint, drive, use_entry):
    _, _, sha256 = checkpoint
    url = drive.share(FILE, scan_warning=True)
    file_id = parse_qs(urlsplit(url).query)["id"][0]
    use_entry(url=url, kind="gdrive", sha256=sha256)
    path = fetch_weights(zoo.get_entry(ENTRY))
    assert_canonical_is(checkpoint, path)
    assert cache_names() == {path.name, path.name + ".json"}
    downloads = [query for host, p, query in drive_gets(drive) if (host, p) == (DRIVE_CONTENT_HOST, "/download")]
    assert downloads == [
        {"id": [file_id], "export": ["download"]},  # answered with the warning page
        {"id": [file_id], "export": ["download"], "confirm": ["t"], "uuid": [drive.confirm_uuid(url)]},
    ]
    assert_sent_by_gdown(drive)


def test_drive_file_with_wrong_bytes_fails_its_checksum_and_leaves_nothing(checkpoint, drive, use_entry):
    _, _, sha256 = checkpoint
    url = drive.share(FILE, scan_warning=True)
    drive.set_fault(FILE, "corrupt")
    use_entry(url=url, kind="gdrive", sha256=sha256)
    with pytest.raises(WeightsNotAvailableError, match=f"does not match the pinned {sha256}") as info:
        fetch_weights(zoo.get_entry(ENTRY))
    assert "\n" not in str(info.value) and url in str(info.value)
    assert cache_names() == set()
    confirmed = [q for _, _, q in drive_gets(drive) if "confirm" in q]
    assert len(confirmed) == 1  # the wrong bytes did arrive whole; the checksum refused them


def test_cli_download_source_takes_a_drive_link(checkpoint, drive, tmp_path):
    _, path, sha256 = checkpoint
    overlay = tmp_path / "overlay.json"
    from test_fetch import entry_json

    overlay.write_text(json.dumps({"schema_version": 1, "entries": {
        ENTRY: entry_json("https://127.0.0.1:9/dead-link", sha256=sha256)}}))
    url = drive.share(FILE, scan_warning=True)
    env = {"SNZOO_OFFLINE": "0", "HF_HUB_OFFLINE": "0", "SNZOO_DOWNLOAD_TIMEOUT": "5"}
    result = CliRunner().invoke(cli, ["--manifest", str(overlay), "download", ENTRY, "--source", url,
                                      "--json", "--quiet"], env=env)
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)
    cached = Path(row["path"])
    assert_canonical_is(checkpoint, cached)
    assert read_record(cached)["source_url"] == url
    assert hashlib.sha256(path.read_bytes()).hexdigest() == read_record(cached)["source_sha256"]
    assert any("confirm" in q for _, _, q in drive_gets(drive))
    assert_sent_by_gdown(drive)


@pytest.mark.parametrize("answer, cause", [
    ("404", "Cannot retrieve the public link of the file"),
    ("over_quota", "Too many users have viewed or downloaded this file recently"),
])
def test_drive_link_that_is_gone_or_over_quota_is_one_clear_error(checkpoint, drive, use_entry, answer, cause):
    _, _, sha256 = checkpoint
    url = drive.share(FILE, over_quota=answer == "over_quota")
    if answer == "404":
        drive.set_fault(FILE, "404")
    use_entry(url=url, kind="gdrive", sha256=sha256)
    with pytest.raises(WeightsNotAvailableError) as info:
        fetch_weights(zoo.get_entry(ENTRY))
    message = str(info.value)
    assert "\n" not in message and f"Google Drive download of {url} failed: {cause}" in message
    assert "use a mirror or --file" in message
    assert cache_names() == set()
