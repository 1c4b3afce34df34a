"""UI backend of the TEST stand-in image.

A tiny stand-in for the upstream UI backend with the same outside contract:
``python3 -m services.ui_backend_service.ui_server`` listens on
``MF_UI_METADATA_HOST``:``MF_UI_METADATA_PORT`` (0.0.0.0:8083) with every
route under ``PATH_PREFIX``:

- ``GET <prefix>/ping``  -> 200 ``pong``
- ``<prefix>/ws``        -> websocket: a JSON hello message, then echo
- anything else          -> 501 JSON ``{"error": "test stand-in: not implemented"}``

Like the real UI backend it IGNORES SIGTERM, SIGINT and SIGHUP (it only logs
them) and runs one child worker process that ignores them too, so a stack
stop procedure has to kill the whole process group to get rid of it.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import sys
import time

IGNORED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
NOT_IMPLEMENTED = {"error": "test stand-in: not implemented"}

log = logging.getLogger("ui-backend-standin")


def normalise_prefix(raw: str | None) -> str:
    if not raw:
        return ""
    prefix = "/" + raw.strip().strip("/")
    return "" if prefix == "/" else prefix


def _log_and_ignore(signum, _frame) -> None:
    # Plain write: safe inside a signal handler, unlike logging.
    name = signal.Signals(signum).name
    os.write(2, f"ui-backend-standin[{os.getpid()}]: received {name}, "
                "ignoring it\n".encode())


def _ignore_signals() -> None:
    for sig in IGNORED_SIGNALS:
        signal.signal(sig, _log_and_ignore)


def cache_worker() -> None:
    """Child process standing in for a cache worker: sleeps forever."""
    _ignore_signals()
    while True:
        time.sleep(3600)


def build_app(prefix: str):
    from aiohttp import WSMsgType, web

    async def ping(_request):
        return web.Response(text="pong")

    async def websocket(request):
        ws = web.WebSocketResponse(heartbeat=20)
        await ws.prepare(request)
        await ws.send_json({
            "type": "hello",
            "server": "metaflow-ui-backend-standin",
            "test_image": True,
        })
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                await ws.send_str(msg.data)
            elif msg.type == WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
            elif msg.type == WSMsgType.ERROR:
                break
        return ws

    async def not_implemented(_request):
        return web.json_response(NOT_IMPLEMENTED, status=501)

    app = web.Application()
    app.router.add_get(prefix + "/ping", ping)
    app.router.add_get(prefix + "/ws", websocket)
    app.router.add_route("*", prefix + "/{tail:.*}", not_implemented)
    if prefix:
        app.router.add_route("*", prefix, not_implemented)
    return app


def main() -> int:
    logging.basicConfig(
        level=os.environ.get("MF_STANDIN_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    host = os.environ.get("MF_UI_METADATA_HOST", "0.0.0.0")
    port = int(os.environ.get("MF_UI_METADATA_PORT", "8083"))
    prefix = normalise_prefix(os.environ.get("PATH_PREFIX"))

    _ignore_signals()
    worker = multiprocessing.get_context("fork").Process(
        target=cache_worker, name="standin-cache-worker", daemon=False)
    worker.start()
    log.info("TEST STAND-IN for the Metaflow UI backend; worker pid %d",
             worker.pid)

    from aiohttp import web

    log.info("listening on %s:%d prefix=%r", host, port, prefix or "/")
    web.run_app(build_app(prefix), host=host, port=port,
                handle_signals=False, print=None, access_log=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
