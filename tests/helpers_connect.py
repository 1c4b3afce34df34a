"""Servers for the `connect` and tunnel tests.

`ProxyStandIn` STANDS IN FOR THE STACK'S REVERSE PROXY (installer/proxy.py, which
is tested separately): a small aiohttp server with the same contract on the points
`connect` relies on:
  /healthz      -> {"status": "ok"} without credentials
  /service/...  -> the metadata service, prefix stripped; needs `x-api-key: <token>`
                   (else 401 JSON with `error` and `how_to_authenticate`); 502 JSON
                   naming the service when it cannot be reached
  /api/...      -> a placeholder for the UI backend (same credentials)
  /             -> a placeholder page; `/?token=<token>` logs a browser in (cookie)

`MetadataService` runs the real `metaflow-local-service` (PyPI, a metadata API
implementation) as a subprocess, adding two routes it lacks and the Metaflow
client uses (GET /flows, GET of a single artifact).

The rest are the misbehaving servers the failure-mode tests point `connect` at.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import requests
from aiohttp import ClientConnectionError, ClientSession, ClientTimeout, web

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
              "transfer-encoding", "upgrade", "host", "content-length", "x-api-key", "cookie"}
COOKIE = "mf_stack_token"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LoopThread:
    """An aiohttp application served from its own event loop in a daemon thread."""

    def __init__(self, app: web.Application, ssl_context: ssl.SSLContext | None = None) -> None:
        self.app = app
        self.ssl_context = ssl_context
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def start(self) -> int:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)
        return self.port

    async def _start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.ssl_context)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)


class ProxyStandIn(LoopThread):
    """Stands in for the stack's reverse proxy; see the module docstring."""

    def __init__(self, token: str, upstream_port: int, *, health_extra: Mapping[str, Any] | None = None) -> None:
        self.token = token
        self.upstream = f"http://127.0.0.1:{upstream_port}"
        self.health_extra = dict(health_extra or {})
        self.requests_seen: list[tuple[str, str]] = []
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_route("*", "/service/{tail:.*}", self.service)
        app.router.add_route("*", "/api/{tail:.*}", self.api)
        app.router.add_get("/", self.index)
        super().__init__(app)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _authorised(self, request: web.Request) -> bool:
        return request.headers.get("x-api-key") == self.token or request.cookies.get(COOKIE) == self.token

    def _refuse(self) -> web.Response:
        return web.json_response(
            {"error": "missing or wrong access token",
             "how_to_authenticate": "send the header `x-api-key: <token>`, or open /?token=<token> once"},
            status=401)

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", **self.health_extra})

    async def service(self, request: web.Request) -> web.StreamResponse:
        self.requests_seen.append((request.method, request.path))
        if not self._authorised(request):
            return self._refuse()
        target = f"{self.upstream}/{request.match_info['tail']}"
        if request.query_string:
            target += f"?{request.query_string}"
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        body = await request.read()
        try:
            async with ClientSession(timeout=ClientTimeout(total=60)) as session, \
                    session.request(request.method, target, headers=headers, data=body or None,
                                    allow_redirects=False) as answer:
                payload = await answer.read()
                out = web.Response(status=answer.status, body=payload)
                for key, value in answer.headers.items():
                    if key.lower() not in HOP_BY_HOP and key.lower() != "content-encoding":
                        out.headers[key] = value
                return out
        except (ClientConnectionError, asyncio.TimeoutError):
            return web.json_response({"error": "the metadata service is not answering", "service": "metadata"},
                                     status=502)

    async def api(self, request: web.Request) -> web.Response:
        if not self._authorised(request):
            return self._refuse()
        return web.json_response({"stand_in": "ui backend placeholder"})

    async def index(self, request: web.Request) -> web.Response:
        if request.query.get("token") == self.token:
            response = web.HTTPFound("/")
            response.set_cookie(COOKIE, self.token, httponly=True, samesite="Lax")
            raise response
        if request.cookies.get(COOKIE) != self.token:
            return web.Response(status=401, text="log in by opening /?token=<token>")
        return web.Response(text="<html><body>Metaflow UI placeholder</body></html>", content_type="text/html")


# ---------------------------------------------------------------- the real metadata service

_LAUNCHER = textwrap.dedent('''
    """Run metaflow-local-service's app with the two read routes the Metaflow client also uses."""
    import sys

    import uvicorn
    from fastapi.responses import JSONResponse

    from metaflow_local_service import server, store

    port, root = int(sys.argv[1]), sys.argv[2]
    app = server.create_app(root)

    @app.get("/flows")
    async def all_flows():
        return JSONResponse(store.list_all_flows())

    def one_artifact(flow, run, step, task, name, attempt=None):
        found = [a for a in store.get_artifacts(flow, run, step, task, attempt) if a.get("name") == name]
        if not found:
            return JSONResponse({"message": "no such artifact"}, status_code=404)
        return JSONResponse(max(found, key=lambda a: int(a.get("attempt_id", 0))))

    @app.get("/flows/{flow}/runs/{run}/steps/{step}/tasks/{task}/artifacts/{name}")
    async def artifact(flow: str, run: str, step: str, task: str, name: str):
        return one_artifact(flow, run, step, task, name)

    @app.get("/flows/{flow}/runs/{run}/steps/{step}/tasks/{task}/artifacts/{name}/attempt/{attempt}")
    async def artifact_attempt(flow: str, run: str, step: str, task: str, name: str, attempt: int):
        return one_artifact(flow, run, step, task, name, attempt)

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
''')


class MetadataService:
    """The real metaflow-local-service metadata API, as a subprocess on a free port."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "metadata-service.log"

    def start(self, timeout: float = 30.0) -> int:
        self.workdir.mkdir(parents=True, exist_ok=True)
        launcher = self.workdir / "run_metadata_service.py"
        launcher.write_text(_LAUNCHER)
        data = self.workdir / "service-data"
        data.mkdir(exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("METAFLOW_")}
        env["HOME"] = str(self.workdir / "service-home")
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, str(launcher), str(self.port), str(data)],
                                         cwd=self.workdir, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"metadata service exited: {self.log.read_text()[-2000:]}")
            try:
                if requests.get(f"http://127.0.0.1:{self.port}/ping", timeout=1).text == "pong":
                    return self.port
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"metadata service not ready within {timeout} s: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


# ---------------------------------------------------------------- servers that are not the stack

class OtherServer(LoopThread):
    """Some unrelated web server: 200 HTML everywhere, or 404 everywhere."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.any)
        super().__init__(app)

    async def any(self, request: web.Request) -> web.Response:
        return web.Response(status=self.status, text="<html><body>Welcome to some other site</body></html>",
                            content_type="text/html")


class SilentServer:
    """Accepts TCP connections and never answers."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = int(self.sock.getsockname()[1])
        self.held: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
                self.held.append(conn)
            except OSError:
                continue

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for conn in self.held:
            conn.close()
        self.sock.close()


class ServeBytes(LoopThread):
    """Serves fixed bytes at every path (a download mirror for the tunnel tests)."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.hits: list[str] = []
        app = web.Application()
        app.router.add_get("/{tail:.*}", self.any)
        super().__init__(app)

    async def any(self, request: web.Request) -> web.Response:
        self.hits.append(request.path)
        return web.Response(body=self.payload, content_type="application/octet-stream")
