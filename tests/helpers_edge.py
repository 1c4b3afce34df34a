"""Attack tools for the edge tests: a backend that records every request it gets, raw-socket clients.

`Recorder` is an HTTP server in the test process (the proxy subprocess connects to
it over TCP) that keeps every request it parsed, body included, and answers each
with a Set-Cookie and a Server header, so a test can assert what reached a
backend, not only what the proxy answered.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Seen:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Recorder:
    server: ThreadingHTTPServer
    seen: list[Seen] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def targets(self) -> list[str]:
        return [s.target for s in self.seen]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def start_recorder() -> Recorder:
    recorder: Recorder

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def _body(self) -> bytes:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                out = b""
                while True:
                    size = int(self.rfile.readline().split(b";")[0], 16)
                    if size == 0:
                        self.rfile.readline()
                        return out
                    out += self.rfile.read(size)
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _answer(self) -> None:
            body = self._body()
            recorder.seen.append(Seen(self.command, self.path, dict(self.headers.items()), body))
            if self.path.endswith("/ping"):
                reply = b"pong"
            else:
                reply = json.dumps({"method": self.command, "target": self.path}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(reply)))
            self.send_header("Set-Cookie", "planted=1; Path=/")
            # An upstream that would let any site read the stack's answers (the object store echoes Origin).
            self.send_header("Access-Control-Allow-Origin", self.headers.get("Origin") or "*")
            self.send_header("Access-Control-Allow-Credentials", "true")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(reply)

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_TRACE = _answer

        def version_string(self) -> str:
            return "RecorderServer/9.9"

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    recorder = Recorder(server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return recorder


def exchange(port: int, data: bytes, *, timeout: float = 10.0) -> tuple[bytes, bool]:
    """Send raw bytes, read until the server closes or goes quiet; (what came back, closed by the server)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        return read_until_quiet(sock, timeout)


def read_until_quiet(sock: socket.socket, timeout: float, quiet: float = 1.0) -> tuple[bytes, bool]:
    received = b""
    deadline = time.monotonic() + timeout
    sock.settimeout(quiet)
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            return received, False
        except ConnectionResetError:
            return received, True
        if not chunk:
            return received, True
        received += chunk
    return received, False


def request_bytes(method: str, target: str, headers: dict[str, str], body: bytes = b"", *,
                  chunked: bool = False) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", *(f"{k}: {v}" for k, v in headers.items())]
    if chunked:
        lines.append("Transfer-Encoding: chunked")
        payload = (f"{len(body):x}\r\n".encode() + body + b"\r\n" if body else b"") + b"0\r\n\r\n"
    else:
        lines.append(f"Content-Length: {len(body)}")
        payload = body
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload


def statuses(raw: bytes) -> list[int]:
    """The status codes of every response in a byte stream (several on a kept-alive connection)."""
    return [int(line.split(b" ")[1]) for line in raw.split(b"\r\n") if line.startswith(b"HTTP/1.")]


def blocks(size: int, block: int = 1024 * 1024) -> Iterator[bytes]:
    piece = b"\0" * block
    sent = 0
    while sent < size:
        yield piece
        sent += block
