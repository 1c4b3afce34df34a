"""Servers for the `connect` and tunnel tests that are not the stack: each misbehaves in its own way.

`LoopThread` serves an aiohttp application from a thread; `OtherServer` answers every request with
one status (some other web server, or a tunnel edge whose origin is gone); `SilentServer` accepts
connections and never answers; `ServeBytes` serves one file (a download mirror).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading

from aiohttp import web


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
