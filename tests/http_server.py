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
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Self
from urllib.parse import unquote, urlsplit

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
        self._httpd = _Server(("127.0.0.1", 0), _Handler, self)
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
