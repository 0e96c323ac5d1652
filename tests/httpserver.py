"""A real, controllable HTTP(S) server on 127.0.0.1 for tests, with Range and fault injection.

    from httpserver import LocalHTTPServer

    with LocalHTTPServer() as server:
        server.add("/img.bin", data, drop_after=4096)   # the first GET is cut after 4096 body bytes
        server.add("/flaky", data, fail_times=2)        # 500, 500, then 200
        server.add("/old", b"", redirect_to="/img.bin") # 302 to another path (or an absolute URL)
        server.add("/evil", data, wrong_bytes=other)    # serves `other` under data's name
        server.add("/slow", data, delay=0.01)           # sleeps between 16 KiB chunks
        server.add("/private", data, auth="bob:pw", query="token=t")  # 401/403 without them
        fetch(server.url("/img.bin"))
        server.requests("/img.bin")  # [Request(method, path, headers, range, status, sent), ...]

Ranges: `bytes=N-` and `bytes=N-M` are answered 206 with Content-Range (416 past the end), and
If-Range is honoured against the ETag or Last-Modified (a mismatch sends the whole body, 200).
`ranges=False` makes the server ignore Range. Faults are counted down per path and can be changed
while the server runs with `server.set(path, ...)`. `tls=True` serves https with a throwaway
self-signed certificate for 127.0.0.1 (made with the openssl CLI); trust it with `server.ca_file`
(e.g. REQUESTS_CA_BUNDLE).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit


@dataclass
class Resource:
    """What one path serves, and the faults it injects."""

    data: bytes
    etag: str | None = None  # default: a strong ETag derived from data
    last_modified: str | None = None  # default: a fixed date
    ranges: bool = True  # honour Range requests
    drop_after: int | None = None  # cut the connection after this many body bytes ...
    drop_times: int = 1  # ... on this many GETs, then serve normally
    fail_times: int = 0  # answer fail_status this many times first
    fail_status: int = 500
    redirect_to: str | None = None  # a path on this server or an absolute URL
    redirect_status: int = 302
    wrong_bytes: bytes | None = None  # served instead of data
    delay: float = 0.0  # seconds to sleep before each chunk
    chunk_size: int = 16384
    head_allowed: bool = True  # False: HEAD answers 405
    auth: str | None = None  # "user:password" required as HTTP Basic auth, else 401
    query: str | None = None  # the exact query string required (e.g. "token=abc"), else 403

    def __post_init__(self) -> None:
        if self.etag is None:
            self.etag = '"' + hashlib.sha256(self.data).hexdigest()[:16] + '"'
        if self.last_modified is None:
            self.last_modified = formatdate(1_700_000_000, usegmt=True)


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]
    status: int
    sent: int = 0  # body bytes actually written

    @property
    def range(self) -> str | None:
        return self.headers.get("Range")


@dataclass
class _State:
    resources: dict[str, Resource] = field(default_factory=dict)
    log: list[Request] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Requests being answered: the log is read only when none is, so that a client which already
    # has its response always finds its request (with its final status and byte count) logged.
    active: int = 0
    idle: threading.Condition = field(default_factory=threading.Condition)


class LocalHTTPServer:
    """A threaded HTTP/1.1 server on 127.0.0.1 and a free port. Use as a context manager."""

    def __init__(self, *, tls: bool = False) -> None:
        self.state = _State()
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.ca_file: Path | None = None
        handler = _make_handler(self.state)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.scheme = "http"
        if tls:
            self._enable_tls()
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def _enable_tls(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="httpserver-tls-")
        cert = Path(self._tmp.name) / "cert.pem"
        key = Path(self._tmp.name) / "key.pem"
        subprocess.run(
            [
                "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2",
                "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
            ],
            check=True,
            capture_output=True,
        )  # fmt: skip
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.ca_file = cert
        self.scheme = "https"

    # ---- lifecycle
    def start(self) -> LocalHTTPServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> LocalHTTPServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- content and faults
    def url(self, path: str) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}{path}"

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}/"

    def add(self, path: str, data: bytes, **faults: Any) -> Resource:
        resource = Resource(data=data, **faults)
        with self.state.lock:
            self.state.resources[path] = resource
        return resource

    def set(self, path: str, **changes: Any) -> None:
        """Change what a path serves or its faults while the server runs."""
        with self.state.lock:
            resource = self.state.resources[path]
            for name, value in changes.items():
                if not hasattr(resource, name):
                    raise AttributeError(name)
                setattr(resource, name, value)

    def remove(self, path: str) -> None:
        with self.state.lock:
            self.state.resources.pop(path, None)

    # ---- what was asked
    def requests(self, path: str | None = None, method: str | None = None) -> list[Request]:
        """The requests answered so far (waits up to 5 s for the ones being answered)."""
        with self.state.idle:
            self.state.idle.wait_for(lambda: self.state.active == 0, timeout=5)
        with self.state.lock:
            return [
                r
                for r in self.state.log
                if (path is None or r.path == path) and (method is None or r.method == method)
            ]

    def gets(self, path: str) -> list[Request]:
        return self.requests(path, "GET")

    def clear_log(self) -> None:
        with self.state.lock:
            self.state.log.clear()


def _make_handler(state: _State) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

        def send_response(self, code: int, message: str | None = None) -> None:
            self.status_sent = code
            super().send_response(code, message)

        def do_GET(self) -> None:
            self._serve(head=False)

        def do_HEAD(self) -> None:
            self._serve(head=True)

        def _serve(self, *, head: bool) -> None:
            path = urlsplit(self.path).path
            headers = dict(self.headers.items())
            status, sent = 0, 0
            self.status_sent = 0
            with state.idle:
                state.active += 1
            try:
                status, sent = self._respond(path, headers, head)
            except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                self.close_connection = True  # the client went away: log what it was sent
                status = self.status_sent
            finally:
                with state.lock:
                    state.log.append(Request(self.command, path, headers, status, sent))
                with state.idle:
                    state.active -= 1
                    state.idle.notify_all()

        def _respond(self, path: str, headers: dict[str, str], head: bool) -> tuple[int, int]:
            with state.lock:
                resource = state.resources.get(path)
                plan = _plan(resource, head)
            if resource is None:
                return self._simple(404, b"not found\n"), 0
            if resource.auth is not None:
                expected = "Basic " + base64.b64encode(resource.auth.encode()).decode()
                if headers.get("Authorization") != expected:
                    return self._simple(401, b"login required\n"), 0
            if resource.query is not None and urlsplit(self.path).query != resource.query:
                return self._simple(403, b"bad token\n"), 0
            if plan.fail_status:
                return self._simple(plan.fail_status, b"injected failure\n"), 0
            if plan.redirect:
                self.send_response(resource.redirect_status)
                self.send_header("Location", plan.redirect)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return resource.redirect_status, 0
            if head and not resource.head_allowed:
                return self._simple(405, b""), 0
            body = resource.wrong_bytes if resource.wrong_bytes is not None else resource.data
            status, start, end = _choose_range(resource, headers, len(body))
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Accept-Ranges", "bytes" if resource.ranges else "none")
            if resource.etag:
                self.send_header("ETag", resource.etag)
            if resource.last_modified:
                self.send_header("Last-Modified", resource.last_modified)
            if status == 416:
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return status, 0
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(body)}")
            self.send_header("Content-Length", str(end - start))
            self.end_headers()
            if head:
                return status, 0
            return status, self._send_body(body[start:end], resource, plan.drop_after)

        def _send_body(self, body: bytes, resource: Resource, drop_after: int | None) -> int:
            sent = 0
            step = max(1, resource.chunk_size)
            while sent < len(body):
                if resource.delay:
                    time.sleep(resource.delay)
                chunk = body[sent : sent + step]
                if drop_after is not None and sent + len(chunk) >= drop_after:
                    self.wfile.write(chunk[: drop_after - sent])
                    self.wfile.flush()
                    self._cut()
                    return drop_after
                self.wfile.write(chunk)
                sent += len(chunk)
            self.wfile.flush()
            return sent

        def _cut(self) -> None:
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)

        def _simple(self, status: int, body: bytes) -> int:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
            return status

    return Handler


@dataclass(frozen=True)
class _Plan:
    fail_status: int = 0
    redirect: str | None = None
    drop_after: int | None = None


def _plan(resource: Resource | None, head: bool) -> _Plan:
    """Decide (and count down) the faults of this request; called with the state lock held."""
    if resource is None:
        return _Plan()
    if resource.fail_times > 0:
        resource.fail_times -= 1
        return _Plan(fail_status=resource.fail_status)
    if resource.redirect_to:
        return _Plan(redirect=resource.redirect_to)
    if not head and resource.drop_after is not None and resource.drop_times > 0:
        resource.drop_times -= 1
        return _Plan(drop_after=resource.drop_after)
    return _Plan()


def _choose_range(resource: Resource, headers: dict[str, str], size: int) -> tuple[int, int, int]:
    """(status, start, end) for a request: 200 whole, 206 a slice, 416 past the end."""
    wanted = headers.get("Range")
    if not resource.ranges or not wanted or not wanted.startswith("bytes="):
        return 200, 0, size
    if_range = headers.get("If-Range")
    if if_range is not None and if_range not in (resource.etag, resource.last_modified):
        return 200, 0, size
    first, _, last = wanted[len("bytes=") :].partition("-")
    if not first.isdigit() or "," in wanted:
        return 200, 0, size
    start = int(first)
    if start >= size:
        return 416, 0, 0
    end = min(int(last) + 1, size) if last.isdigit() else size
    return 206, start, end
