"""Relaying an admitted websocket (the UI's /api/ws) frame by frame, both ways, close codes included."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
from aiohttp import web

from .forward import Upstream
from .pages import SERVER_NAME, json_error

__all__ = ["relay_websocket"]

log = logging.getLogger("installer.proxy")

_WS_MAX_MESSAGE = 64 * 1024 * 1024


def _ws_close_code(code: int | None) -> int:
    # 1005/1006/1015 describe a missing close frame; they cannot be sent in one.
    if code is None or code == 1005:
        return 1000
    if code in (1006, 1015) or not (1000 <= code <= 4999):
        return 1001  # the other side went away without a proper close
    return code


async def relay_websocket(request: web.BaseRequest, upstream: Upstream, session: aiohttp.ClientSession,
                          headers: list[tuple[str, str]], target: str | None = None) -> web.StreamResponse:
    offered = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
    try:
        upstream_ws = await session.ws_connect(
            upstream.url(target or request.raw_path), headers=headers, protocols=offered, autoping=True,
            max_msg_size=_WS_MAX_MESSAGE, timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=5.0))
    except aiohttp.WSServerHandshakeError as exc:
        return json_error(exc.status if 400 <= exc.status < 600 else 502,
                          f"{upstream.name} refused the websocket ({exc.status})")
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
        return upstream.down()
    client_ws = web.WebSocketResponse(protocols=[upstream_ws.protocol] if upstream_ws.protocol else (),
                                      autoping=True, heartbeat=30.0, max_msg_size=_WS_MAX_MESSAGE)
    client_ws.headers["Server"] = SERVER_NAME
    try:
        await client_ws.prepare(request)
    except Exception:
        await upstream_ws.close()
        raise

    relay = asyncio.ensure_future(_relay(client_ws, upstream_ws))
    try:
        # Shielded: when the browser's connection drops, the handler is cancelled, but the relay
        # must still pass the browser's close code on to the upstream and close it cleanly.
        await asyncio.shield(relay)
    except asyncio.CancelledError:
        await asyncio.wait({relay}, timeout=5.0)
        relay.cancel()
        raise
    return client_ws


async def _relay(client_ws: web.WebSocketResponse, upstream_ws: aiohttp.ClientWebSocketResponse) -> None:
    async def pump(source: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
                   sink: web.WebSocketResponse | aiohttp.ClientWebSocketResponse) -> None:
        async for message in source:
            if message.type == aiohttp.WSMsgType.TEXT:
                await sink.send_str(message.data)
            elif message.type == aiohttp.WSMsgType.BINARY:
                await sink.send_bytes(message.data)
            elif message.type == aiohttp.WSMsgType.ERROR:
                break
        if not sink.closed:
            await sink.close(code=_ws_close_code(source.close_code))

    tasks = [asyncio.ensure_future(pump(client_ws, upstream_ws)),
             asyncio.ensure_future(pump(upstream_ws, client_ws))]
    try:
        _done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        # The side that finished first has closed the other; let the other pump see that close.
        await asyncio.wait(pending, timeout=5.0)
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                log.info("websocket relay ended: %s", task.exception().__class__.__name__)
        if not upstream_ws.closed:
            await upstream_ws.close(code=1001)
        if not client_ws.closed:
            await client_ws.close(code=1001)
