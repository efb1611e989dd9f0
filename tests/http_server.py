"""A real HTTP file server on 127.0.0.1 for tests, with faults a test can switch on per path.

    server = start_server(directory)
    server.set_fault("/a.pth", "truncate")
    url = server.url("/a.pth")
    ...
    server.close()

Faults (``count`` limits how many requests to the path get it; None means all of them):

    truncate          announce the full Content-Length, send half the body, close      (default count: all)
    corrupt           send the right length with some bytes flipped                     (all)
    404               answer 404 Not Found                                              (all)
    500_then_ok       answer 500 Internal Server Error, then serve normally            (2)
    drop_then_resume  send half the body, then reset the connection; Range works after (1)
    no_range          ignore Range headers: always 200 with the whole body              (all)
    stall             send headers and part of the body, then go silent for
                      ``stall_seconds`` or until the server closes                     (all)
    html              answer 200 with an HTML page, like Google Drive's confirmation    (all)
    shifted_range     answer 206 with the range one byte later than asked (even for a
                      request without Range), Content-Range saying so                 (all)

Without a fault, files are served with single-range support (206 + Content-Range, 416 past the end).

Google Drive as gdown meets it (``start_drive_server``): an HTTPS proxy on 127.0.0.1 that answers CONNECT for
drive.google.com and drive.usercontent.google.com only, ends the TLS itself with a certificate from a CA made
for the test, and plays both hosts: ``/uc?id=ID`` redirects to ``/download?id=ID&export=download``, which sends
the file (``Content-Disposition: attachment``) or, for a file shared with ``scan_warning=True``, the "virus scan
warning" page whose ``download-form`` carries the ``confirm`` and ``uuid`` to come back with. Clients reach it
through ``client_environment()`` (HTTPS_PROXY and REQUESTS_CA_BUNDLE, which requests reads), so no request can
leave the machine: the proxy opens no connection of its own. The faults ``corrupt`` and ``404`` apply to a shared
file by its name.
"""

from __future__ import annotations

import html
import secrets
import socket
import socketserver
import ssl
import struct
import subprocess
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Self
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

FAULTS = ("truncate", "corrupt", "404", "500_then_ok", "drop_then_resume", "no_range", "stall", "html", "shifted_range")
_DEFAULT_COUNTS = {"500_then_ok": 2, "drop_then_resume": 1}

GDRIVE_LIKE_PAGE = b"""<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head>
<body><p>Google Drive can't scan this file for viruses.</p>
<form id="download-form" action="/uc" method="get"><input type="hidden" name="confirm" value="t">
<input type="submit" value="Download anyway"></form></body></html>
"""


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the server saw it."""

    method: str
    path: str
    range: str | None
    headers: dict[str, str] = field(compare=False)
    # Through the Drive proxy: the host the request was for and its query ("" elsewhere).
    host: str = field(default="", compare=False)
    query: str = field(default="", compare=False)


@dataclass
class _Fault:
    kind: str
    remaining: int | None
    stall_seconds: float


class FileServer:
    """A threaded HTTP server serving ``directory``; use ``start_server`` to get a running one."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory).resolve()
        self._lock = threading.Lock()
        self._log: list[RecordedRequest] = []
        self._faults: dict[str, _Fault] = {}
        self._closing = threading.Event()
        self._connections: set[socket.socket] = set()
        self._handler_threads: set[threading.Thread] = set()
        self._httpd = _Server(("127.0.0.1", 0), self._handler_class(), self)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name=f"FileServer:{self.port}",
            daemon=True,
        )
        self._thread.start()

    def url(self, path: str) -> str:
        """The http URL of ``path`` (e.g. "/a.pth") on this server."""
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}"

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request received so far, oldest first."""
        with self._lock:
            return list(self._log)

    def requests_for(self, path: str) -> list[RecordedRequest]:
        """The requests received for one path."""
        path = "/" + path.lstrip("/")
        return [r for r in self.requests if r.path == path]

    def set_fault(self, path: str, fault: str, *, count: int | None = -1, stall_seconds: float = 60.0) -> None:
        """Make requests to ``path`` misbehave; ``count`` requests get the fault (None: all; default per fault)."""
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; choose one of {', '.join(FAULTS)}")
        if count == -1:
            count = _DEFAULT_COUNTS.get(fault)
        with self._lock:
            self._faults["/" + path.lstrip("/")] = _Fault(fault, count, stall_seconds)

    def clear_faults(self) -> None:
        """Serve every path normally again."""
        with self._lock:
            self._faults.clear()

    def close(self, timeout: float = 5.0) -> None:
        """Stop serving, cut open connections (ending any stall) and wait for the handler threads."""
        self._closing.set()
        self._httpd.shutdown()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._httpd.server_close()
        self._thread.join(timeout)
        deadline = time.monotonic() + timeout
        with self._lock:
            threads = list(self._handler_threads)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in threads if t.is_alive()]
        if alive or self._thread.is_alive():
            raise RuntimeError(f"FileServer threads still running after close: {alive}")

    def __enter__(self) -> Self:
        return self

    def _handler_class(self) -> type:
        return _Handler

    def __exit__(self, *exc_info) -> None:
        self.close()

    # Called from handler threads.

    def _take_fault(self, path: str) -> _Fault | None:
        with self._lock:
            fault = self._faults.get(path)
            if fault is None or fault.remaining == 0:
                return None
            if fault.remaining is not None:
                fault.remaining -= 1
            return fault

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self._log.append(request)

    def _register(self, conn: socket.socket, thread: threading.Thread) -> None:
        with self._lock:
            self._connections.add(conn)
            self._handler_threads.add(thread)

    def _unregister(self, conn: socket.socket, thread: threading.Thread) -> None:
        with self._lock:
            self._connections.discard(conn)
            self._handler_threads.discard(thread)


def start_server(directory: Path) -> FileServer:
    """A running FileServer for ``directory`` on 127.0.0.1 at a free port; close() it when done."""
    return FileServer(directory)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # close() joins the handler threads itself, with a deadline.
    block_on_close = False

    def __init__(self, address, handler, owner: FileServer) -> None:
        self.owner = owner
        super().__init__(address, handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # An idle keep-alive connection must not hold its thread for ever.
    timeout = 10
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.owner._register(self.connection, threading.current_thread())

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass
        self.server.owner._unregister(self.connection, threading.current_thread())

    def log_message(self, format: str, *args) -> None:
        pass  # the request log is the record; stderr noise would bury test output

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except (ConnectionError, TimeoutError, OSError):
            # The client hung up or the server is closing; neither is the test's business.
            self.close_connection = True

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def _serve(self, head: bool) -> None:
        owner = self.server.owner
        path = urlsplit(self.path).path
        owner._record(RecordedRequest(self.command, path, self.headers.get("Range"), dict(self.headers.items())))
        fault = owner._take_fault(path)
        kind = fault.kind if fault else None

        if kind == "404":
            return self._simple(404, b"not found\n")
        if kind == "500_then_ok":
            return self._simple(500, b"internal error\n")
        if kind == "html":
            return self._simple(200, GDRIVE_LIKE_PAGE, "text/html; charset=utf-8", head=head)

        file = self._file(path)
        if file is None:
            return self._simple(404, b"not found\n")
        data = file.read_bytes()
        size = len(data)

        start, status = 0, 200
        requested = None if kind == "no_range" else _parse_range(self.headers.get("Range"))
        if kind == "shifted_range":
            requested = ((requested or (0, None))[0] + 1, None)
        if requested is not None:
            first, last = requested
            if first >= size:
                return self._simple(416, b"range not satisfiable\n", extra={"Content-Range": f"bytes */{size}"})
            last = size - 1 if last is None else min(last, size - 1)
            start, status = first, 206
            data = data[first : last + 1]

        if kind == "corrupt":
            data = _flip_bytes(data)

        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Accept-Ranges", "none" if kind == "no_range" else "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{start + len(data) - 1}/{size}")
        if kind in ("truncate", "drop_then_resume", "stall"):
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if head:
            return

        if kind == "truncate":
            self.wfile.write(data[: len(data) // 2])
        elif kind == "drop_then_resume":
            self.wfile.write(data[: len(data) // 2])
            # SO_LINGER 0 makes close() send RST: an abrupt drop, not an orderly end of stream.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif kind == "stall":
            self.wfile.write(data[: len(data) // 4])
            if not owner._closing.wait(fault.stall_seconds):
                self.wfile.write(data[len(data) // 4 :])
        else:
            self.wfile.write(data)

    def _file(self, path: str) -> Path | None:
        root = self.server.owner.directory
        candidate = (root / unquote(path).lstrip("/")).resolve()
        if not candidate.is_relative_to(root) or not candidate.is_file():
            return None
        return candidate

    def _simple(self, status: int, body: bytes, content_type: str = "text/plain", *, head: bool = False,
                extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)


def _parse_range(value: str | None) -> tuple[int, int | None] | None:
    """A single ``bytes=FIRST-[LAST]`` range; None for anything else, which servers then ignore."""
    if not value or not value.startswith("bytes=") or "," in value:
        return None
    first, _, last = value[len("bytes="):].strip().partition("-")
    if not first.isdigit() or (last and not last.isdigit()):
        return None
    return int(first), int(last) if last else None


def _flip_bytes(data: bytes) -> bytes:
    """Invert a few bytes spread through the body, keeping its length."""
    if not data:
        return data
    out = bytearray(data)
    for i in range(len(out) // 3, len(out), max(1, len(out) // 7)):
        out[i] ^= 0xFF
    return bytes(out)


DRIVE_HOST = "drive.google.com"
DRIVE_CONTENT_HOST = "drive.usercontent.google.com"
_DRIVE_HOSTS = (DRIVE_HOST, DRIVE_CONTENT_HOST)


@dataclass(frozen=True)
class TlsFiles:
    """A CA certificate for clients to trust, and the Drive hosts' certificate and key it signed."""

    ca: Path
    cert: Path
    key: Path


def make_tls_files(directory: Path) -> TlsFiles:
    """A fresh test CA and a certificate for the Drive hosts signed by it, written with the openssl tool."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca, key, csr, cert = (directory / n for n in ("ca.key", "ca.pem", "drive.key", "drive.csr", "drive.pem"))
    extensions = directory / "drive.ext"
    extensions.write_text(
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
        f"subjectAltName={','.join('DNS:' + h for h in _DRIVE_HOSTS)}\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
    )
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    commands = [
        ["req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "2", "-subj", "/CN=snzoo test CA",
         "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        ["req", *ec, "-keyout", key, "-out", csr, "-subj", f"/CN={DRIVE_HOST}"],
        ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-days", "2",
         "-out", cert, "-extfile", extensions],
    ]
    for command in commands:
        subprocess.run(["openssl", *map(str, command)], check=True, capture_output=True)
    return TlsFiles(ca, cert, key)


@dataclass(frozen=True)
class _Shared:
    file_name: str
    scan_warning: bool
    uuid: str
    over_quota: bool = False


class DriveServer(FileServer):
    """Google Drive behind an HTTPS proxy on 127.0.0.1; use ``start_drive_server`` to get a running one."""

    def __init__(self, directory: Path, tls: TlsFiles) -> None:
        self.tls = tls
        self._tls_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._tls_context.load_cert_chain(tls.cert, tls.key)
        self._shared: dict[str, _Shared] = {}
        super().__init__(directory)

    @property
    def proxy_url(self) -> str:
        """The proxy's own address, for HTTPS_PROXY."""
        return f"http://127.0.0.1:{self.port}"

    def share(self, file_name: str, *, scan_warning: bool = False, over_quota: bool = False) -> str:
        """Publish a file of the directory under a new Drive id; its ``https://drive.google.com/uc?id=`` link.

        ``scan_warning``: answer the download with the "can't scan this file for viruses" page first, as Drive
        does for large files. ``over_quota``: answer with Drive's "too many users" error page instead.
        """
        file_id = secrets.token_urlsafe(24)[:33]
        with self._lock:
            self._shared[file_id] = _Shared(file_name, scan_warning, secrets.token_hex(16), over_quota)
        return f"https://{DRIVE_HOST}/uc?id={file_id}"

    def confirm_uuid(self, url: str) -> str:
        """The uuid the warning page of a shared link asks the download to come back with."""
        return self._shared[parse_qs(urlsplit(url).query)["id"][0]].uuid

    def client_environment(self) -> dict[str, str]:
        """Variables that make requests (and so gdown) reach Drive through this server and trust its CA."""
        proxy, ca = self.proxy_url, str(self.tls.ca)
        # Plain-http test servers on 127.0.0.1 stay reachable directly.
        direct = "127.0.0.1,localhost"
        return {"HTTPS_PROXY": proxy, "https_proxy": proxy, "NO_PROXY": direct, "no_proxy": direct,
                "REQUESTS_CA_BUNDLE": ca, "CURL_CA_BUNDLE": ca}

    def requests_to(self, host: str, path: str) -> list[RecordedRequest]:
        """The requests received through the tunnel for one host and path."""
        return [r for r in self.requests if r.host == host and r.path == path]

    def _handler_class(self) -> type:
        return _DriveHandler

    def _lookup(self, file_id: str) -> _Shared | None:
        with self._lock:
            return self._shared.get(file_id)


def start_drive_server(directory: Path, tls: TlsFiles) -> DriveServer:
    """A running DriveServer publishing files of ``directory``; close() it when done."""
    return DriveServer(directory, tls)


OVER_QUOTA_PAGE = (
    b'<!DOCTYPE html><html><head><title>Google Drive - Quota exceeded</title></head><body><div class="uc-main">'
    b'<div id="uc-text"><p class="uc-error-caption">Sorry, you can&#39;t view or download this file at this time.</p>'
    b'<p class="uc-error-subcaption">Too many users have viewed or downloaded this file recently. Please try '
    b'accessing the file again later.</p></div></div></body></html>\n'
)


def _scan_warning_page(file_id: str, shared: _Shared, size: int) -> bytes:
    # One line, as Drive sends it: gdown reads the page line by line and needs the form and its inputs together.
    name = html.escape(shared.file_name)
    fields = {"id": file_id, "export": "download", "confirm": "t", "uuid": shared.uuid}
    inputs = "".join(f'<input type="hidden" name="{k}" value="{html.escape(v)}">' for k, v in fields.items())
    return (
        '<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title><meta http-equiv="content-type" '
        'content="text/html; charset=utf-8"/></head><body><div class="uc-main"><div id="uc-text">'
        '<p class="uc-warning-caption">Google Drive can\'t scan this file for viruses.</p>'
        f'<p class="uc-warning-subcaption"><span class="uc-name-size"><a href="/open?id={file_id}">{name}</a> '
        f'({size // (1 << 20)}M)</span> is too large for Google to scan for viruses. Would you still like to '
        f'download this file?</p><form id="download-form" action="https://{DRIVE_CONTENT_HOST}/download" '
        'method="get"><input type="submit" id="uc-download-link" class="goog-inline-block jfk-button '
        f'jfk-button-action" value="Download anyway"/>{inputs}</form></div></div></body></html>\n'
    ).encode()


class _DriveHandler(_Handler):
    _tunnel_host: str | None = None
    _tls: ssl.SSLSocket | None = None

    def do_CONNECT(self) -> None:
        owner = self.server.owner
        host, _, port = self.path.rpartition(":")
        owner._record(RecordedRequest("CONNECT", self.path, None, dict(self.headers.items()), host=host))
        if self._tunnel_host is not None or host not in _DRIVE_HOSTS or port != "443":
            self.close_connection = True
            return self._simple(403, f"this proxy reaches only {', '.join(_DRIVE_HOSTS)}\n".encode())
        self.send_response(200, "Connection established")
        self.end_headers()
        # The requests that follow on this connection are the client's, inside TLS to the Drive host.
        tls = owner._tls_context.wrap_socket(self.connection, server_side=True)
        tls.settimeout(self.timeout)
        self._tls, self._tunnel_host = tls, host
        owner._register(tls, threading.current_thread())
        self.rfile = tls.makefile("rb", self.rbufsize)
        self.wfile = socketserver._SocketWriter(tls)
        self.close_connection = False

    def finish(self) -> None:
        super().finish()
        if self._tls is not None:
            self.server.owner._unregister(self._tls, threading.current_thread())
            self._tls.close()

    def _serve(self, head: bool) -> None:
        owner = self.server.owner
        parts = urlsplit(self.path)
        owner._record(RecordedRequest(self.command, parts.path, self.headers.get("Range"), dict(self.headers.items()),
                                      host=self._tunnel_host or "", query=parts.query))
        if self._tunnel_host is None:
            return self._simple(400, b"reach Drive through CONNECT (HTTPS_PROXY)\n", head=head)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        shared = owner._lookup(query.get("id", ""))
        file = self._file("/" + shared.file_name) if shared else None
        fault = owner._take_fault("/" + shared.file_name) if shared else None
        if file is None or (fault and fault.kind == "404"):
            return self._simple(404, b"<html><body>Sorry, the file you have requested does not exist.</body></html>",
                                "text/html; charset=utf-8", head=head)
        if self._tunnel_host == DRIVE_HOST and parts.path == "/uc":
            target = f"https://{DRIVE_CONTENT_HOST}/download?" + urlencode({"id": query["id"], "export": "download"})
            return self._simple(303, b"", "text/html; charset=utf-8", head=head, extra={"Location": target})
        if self._tunnel_host != DRIVE_CONTENT_HOST or parts.path != "/download":
            return self._simple(404, b"not found\n", head=head)
        if shared.over_quota:
            return self._simple(200, OVER_QUOTA_PAGE, "text/html; charset=utf-8", head=head)
        data = file.read_bytes()
        confirmed = query.get("confirm") == "t" and query.get("uuid") == shared.uuid
        if shared.scan_warning and not confirmed:
            page = _scan_warning_page(query["id"], shared, len(data))
            return self._simple(200, page, "text/html; charset=utf-8", head=head)
        if fault and fault.kind == "corrupt":
            data = _flip_bytes(data)
        disposition = f"attachment; filename=\"{shared.file_name}\"; filename*=UTF-8''{quote(shared.file_name)}"
        self._simple(200, data, "application/octet-stream", head=head, extra={"Content-Disposition": disposition})
