"""Real servers and processes for the proxy tests.

Run as a script, this file is an upstream server for the proxy to forward to:

    python tests/helpers_proxy.py upstream --port N
        A small aiohttp HTTP + websocket server that shows what reached it: it
        answers /ping and /api/ping, echoes what it received as JSON, counts
        streamed uploads, streams responses on request, holds requests open to
        observe cancellation, and serves a websocket at /api/ws. The real
        services are behind the proxy in the tests that run flows (the shared stack).

The rest are helpers the tests import: free ports, starting/stopping the proxy
as a real `python -m installer.proxy` subprocess, raw HTTP requests that keep the
request target byte-for-byte.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import http.client
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from installer import procs

HELPER = Path(__file__).resolve()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout: float = 30.0, accept: tuple[int, ...] = (200,), pid: int | None = None,
              log: Path | None = None) -> int:
    """Poll `url` until it answers with a status in `accept`; fail loudly with the log on timeout or death."""
    import requests

    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if pid is not None and not procs.alive(pid):
            raise AssertionError(f"process {pid} died while starting; log:\n{procs.tail(log) if log else ''}")
        try:
            status = requests.get(url, timeout=2).status_code
            if status in accept:
                return status
            last = f"status {status}"
        except requests.RequestException as exc:
            last = exc.__class__.__name__
        time.sleep(0.1)
    raise AssertionError(f"{url} not ready after {timeout} s ({last}); log:\n{procs.tail(log) if log else ''}")


@dataclass
class Process:
    pid: int
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        procs.send(self.pid, signal.SIGTERM)
        if procs.wait_gone([self.pid], timeout=10):
            procs.kill_tree([self.pid])
            procs.wait_gone([self.pid], timeout=5)

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError(f"no VmRSS for {self.pid}")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class ProxyProcess(Process):
    token_file: Path
    static_dir: Path

    @property
    def token(self) -> str:
        return self.token_file.read_text().strip()


def start_upstream(workdir: Path, port: int | None = None) -> Process:
    port = port or free_port()
    log = workdir / f"upstream-{port}.log"
    pid = procs.spawn([sys.executable, str(HELPER), "upstream", "--port", str(port)], log_path=log)
    proc = Process(pid, port, log)
    wait_http(f"{proc.url}/ping", pid=pid, log=log)
    return proc


def start_proxy(workdir: Path, *, metadata_url: str, ui_url: str, static_dir: Path,
                token_file: Path | None = None, extra: list[str] | None = None,
                listen_host: str = "127.0.0.1") -> ProxyProcess:
    port = free_port()
    token_file = token_file or workdir / "secrets" / f"proxy-token-{port}"
    log = workdir / f"proxy-{port}.log"
    cmd = [sys.executable, "-m", "installer.proxy", "--listen-host", listen_host, "--listen-port", str(port),
           "--metadata-url", metadata_url, "--ui-backend-url", ui_url, "--static-dir", str(static_dir),
           "--token-file", str(token_file), *(extra or [])]
    pid = procs.spawn(cmd, log_path=log, cwd=REPO)
    proxy = ProxyProcess(pid, port, log, token_file, static_dir)
    # Any HTTP answer means the proxy is up; 503 only says an upstream is down.
    wait_http(f"{proxy.url}/healthz", accept=(200, 503), pid=pid, log=log)
    return proxy


def make_static_dir(workdir: Path) -> Path:
    """A UI bundle laid out like metaflow-ui's: index.html, hashed assets under static/, a symlink trap."""
    root = workdir / "ui"
    (root / "static" / "js").mkdir(parents=True)
    (root / "static" / "css").mkdir(parents=True)
    (root / "index.html").write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>Fixture UI</title>"
        "<link rel='stylesheet' href='/static/css/main.1a2b3c.css'></head>"
        "<body><div id='root'>Fixture UI index</div>"
        "<script src='/static/js/main.4d5e6f.js'></script></body></html>\n")
    (root / "static" / "js" / "main.4d5e6f.js").write_text(
        "window.fixtureLoaded = true; document.getElementById('root').dataset.loaded = 'yes';\n")
    (root / "static" / "css" / "main.1a2b3c.css").write_text("body { background: #fafafa; }\n")
    secret = workdir / "outside-secret.txt"
    secret.write_text("OUTSIDE-THE-BUNDLE\n")
    (root / "static" / "escape.txt").symlink_to(secret)
    (root / "static" / "escape-dir").symlink_to(workdir)
    return root


def raw_request(port: int, method: str, target: str, headers: dict[str, str] | None = None,
                body: bytes | None = None, timeout: float = 30.0) -> tuple[int, dict[str, str], bytes]:
    """Send the request target exactly as given (no normalisation) and return (status, headers, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.putrequest(method, target, skip_host=False, skip_accept_encoding=True)
        for name, value in (headers or {}).items():
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


# --------------------------------------------------------------------------------------------------
# The upstream servers (run in their own process)
# --------------------------------------------------------------------------------------------------

def _upstream_app():
    from aiohttp import WSMsgType, web

    state = {"cancelled": 0, "held": 0, "release": asyncio.Event(), "ws_closes": []}

    async def ping(request: web.Request) -> web.Response:
        return web.Response(text="pong", headers={"METADATA_SERVICE_VERSION": "2.5.0"})

    async def stats(request: web.Request) -> web.Response:
        return web.json_response({"cancelled": state["cancelled"], "held": state["held"],
                                  "ws_closes": state["ws_closes"]})

    async def release(request: web.Request) -> web.Response:
        state["release"].set()
        return web.json_response({"released": True})

    async def stream(request: web.Request) -> web.StreamResponse:
        state["release"] = asyncio.Event()
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await response.prepare(request)
        await response.write(b"first-chunk\n")
        await state["release"].wait()
        await response.write(b"second-chunk\n")
        await response.write_eof()
        return response

    async def big(request: web.Request) -> web.StreamResponse:
        size = int(request.query.get("bytes", "0"))
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = size
        await response.prepare(request)
        block = b"x" * 65536
        sent = 0
        while sent < size:
            piece = block[:min(len(block), size - sent)]
            await response.write(piece)
            sent += len(piece)
        await response.write_eof()
        return response

    async def hold(request: web.Request) -> web.Response:
        state["held"] += 1
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            state["cancelled"] += 1
            raise
        return web.Response(text="never")

    async def websocket(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=("fixture-v1",))
        await ws.prepare(request)
        await ws.send_json({"hello": "from the test upstream",
                            "headers": {k.lower(): v for k, v in request.headers.items()}})
        async for message in ws:
            if message.type == WSMsgType.TEXT:
                if message.data.startswith("close:"):
                    await ws.close(code=int(message.data.split(":", 1)[1]), message=b"asked to")
                    break
                await ws.send_str("echo:" + message.data)
            elif message.type == WSMsgType.BINARY:
                await ws.send_bytes(message.data[::-1])
        state["ws_closes"].append(ws.close_code)
        return ws

    async def echo(request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        count = 0
        async for chunk in request.content.iter_any():
            count += len(chunk)
            digest.update(chunk)
        return web.json_response({
            "method": request.method, "path": request.path, "raw_path": request.raw_path,
            "query": request.query_string,
            "headers": [[k, v] for k, v in request.headers.items()],
            "bytes": count, "sha256": digest.hexdigest(),
        }, headers={"Set-Cookie": "upstream=1; Path=/", "X-Upstream": "fixture"})

    app = web.Application()
    app.router.add_get("/ping", ping)
    app.router.add_get("/api/ping", ping)
    app.router.add_get("/api/stats", stats)
    app.router.add_get("/stats", stats)
    app.router.add_post("/api/release", release)
    app.router.add_get("/api/stream", stream)
    app.router.add_get("/api/big", big)
    app.router.add_get("/api/hold", hold)
    app.router.add_get("/hold", hold)
    app.router.add_get("/api/ws", websocket)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


def _run_upstream(port: int) -> None:
    from aiohttp import web

    web.run_app(_upstream_app(), host="127.0.0.1", port=port, print=None, handler_cancellation=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="what", required=True)
    up = sub.add_parser("upstream")
    up.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    _run_upstream(args.port)
