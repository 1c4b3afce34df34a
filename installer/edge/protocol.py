"""The connection level of the entry point: slow clients, connection counts, unparseable requests.

aiohttp's server has no deadline for a request head and answers a malformed
request with a page (and a log record) quoting the raw bytes it choked on. This
subclass of its connection handler adds:

- a head deadline: from the first byte of a request head to its end (slowloris
  holds connections by sending a head a byte at a time), for every request on a
  connection: bytes of a next request that came with the end of the previous one
  start the deadline when that one's response is done. Idle kept-alive
  connections are left to the idle timeout, because closing them sooner races
  with clients (cloudflared included) that reuse them;
- a cap on open connections per peer address (larger for cloudflared's loopback
  peer behind the tunnel, which every visitor shares; access.py caps each
  visitor's requests in progress);
- fixed-text error pages for malformed requests, and a log record that names the
  error (redacted like every record; see redact.py).

It relies on a few attributes of aiohttp's RequestHandler (_request_count,
_messages, _force_close); tests/test_edge_security.py fails if they change.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web, web_protocol, web_server

from .config import is_loopback
from .pages import SERVER_NAME
from .quiet import refusals

__all__ = ["ConnectionLimits", "EdgeServer"]

log = logging.getLogger("installer.proxy")


def _raw_response(status: str, text: str) -> bytes:
    """A complete HTTP response that closes the connection, for use below the request level."""
    body = text.encode()
    return (f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode() + body


_TOO_MANY = _raw_response("503 Service Unavailable", "too many open connections from this address\n")
_HEAD_TIMEOUT = _raw_response("408 Request Timeout", "the request head took too long to arrive\n")
_ERROR_TEXT = {400: "400 Bad Request: the request could not be parsed (malformed request line or headers)\n",
               413: "413 Request Entity Too Large\n",
               414: "414 URI Too Long\n",
               431: "431 Request Header Fields Too Large\n",
               500: "500 Internal Server Error: the proxy failed on this request; its log says why\n"}


class ConnectionLimits:
    """Open connections per peer, shared by every connection of one server."""

    def __init__(self, head_deadline: float, per_client: int, tunnel_peer: int | None = None) -> None:
        self.head_deadline = head_deadline
        self.per_client = per_client
        self.tunnel_peer = tunnel_peer   # the cap for a loopback peer behind the tunnel (None: no tunnel)
        self._open: dict[str, int] = {}

    def cap(self, peer: str) -> int:
        if self.tunnel_peer is not None and is_loopback(peer):
            return self.tunnel_peer
        return self.per_client

    def acquire(self, peer: str) -> bool:
        count = self._open.get(peer, 0)
        if count >= self.cap(peer):
            return False
        self._open[peer] = count + 1
        return True

    def release(self, peer: str) -> None:
        count = self._open.get(peer, 0) - 1
        if count > 0:
            self._open[peer] = count
        else:
            self._open.pop(peer, None)


class _EdgeProtocol(web_protocol.RequestHandler):
    def __init__(self, manager: web_server.Server, *, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._limits = limits
        self._peer: str | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._in_request = False
        self._tail = False                 # bytes of a next request arrived with the end of the last one
        self._body_left: int | None = 0    # bytes of the last request's body still to come (None: chunked)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        address = str(peer[0]) if isinstance(peer, tuple) and peer else "local"
        if not self._limits.acquire(address):
            refusals.line(log, logging.WARNING,
                          f"refused a connection from {address}: already {self._limits.cap(address)} open")
            transport.write(_TOO_MANY)  # type: ignore[attr-defined]
            self.force_close()
            return
        self._peer = address

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._peer is not None:
            self._limits.release(self._peer)
            self._peer = None
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def data_received(self, data: bytes) -> None:
        before = self._request_count
        super().data_received(data)
        if self._request_count != before:
            self._in_request = True
            self._cancel_head_timer()
            self._note_tail(data)
        elif self._body_left and data:
            self._tail = self._tail or len(data) > self._body_left
            self._body_left = max(0, self._body_left - len(data))
        elif data and not self._in_request and self._head_timer is None and not self._force_close:
            # Armed only for a head still incomplete after this chunk (its first bytes came now):
            # a head that arrives whole, the usual case, costs no timer.
            self._head_timer = self._loop.call_later(self._limits.head_deadline, self._head_expired)

    def _note_tail(self, data: bytes) -> None:
        """Whether `data`, which completed a request head, also holds the start of another request."""
        if not self._messages:
            return
        message, payload = self._messages[-1]
        if getattr(message, "chunked", False):
            self._body_left = None  # where a chunked body ends is the parser's secret: the idle timeout applies
            return
        try:
            length = int(message.headers.get("Content-Length") or 0)
        except (ValueError, AttributeError):
            return
        got = getattr(payload, "total_bytes", 0) if length else 0
        self._body_left = length - got
        if self._body_left > 0:
            return
        head = data[:len(data) - length] if length else data
        self._tail = not head.endswith((b"\r\n\r\n", b"\n\n"))

    def _head_expired(self) -> None:
        self._head_timer = None
        if self._in_request or self.transport is None:
            return
        refusals.line(log, logging.INFO, f"closed a connection from {self._peer}: its request head was not "
                      f"complete after {self._limits.head_deadline:.0f} s")
        self.transport.write(_HEAD_TIMEOUT)
        self.force_close()

    async def finish_response(self, request: web.BaseRequest, resp: web.StreamResponse,
                              start_time: float | None) -> tuple[web.StreamResponse, bool]:
        try:
            return await super().finish_response(request, resp, start_time)
        finally:
            if not self._messages:
                self._in_request = False
                if self._tail and self._head_timer is None and not self._force_close:
                    self._head_timer = self._loop.call_later(self._limits.head_deadline, self._head_expired)
                self._tail = False

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status >= 500:
            # A failure of the proxy's own (a bug) keeps its traceback, at the rate of refusal lines.
            if refusals.allow():
                log.error("%s", refusals.text(f"error handling a request from {request.remote}"), exc_info=exc)
        else:
            refusals.line(log, logging.INFO, f"refused a malformed request from {request.remote}: {exc or message}")
        if request.writer.output_size > 0:
            raise ConnectionError("the response was already started; cannot send an error page")
        text = _ERROR_TEXT.get(status) or f"{status} error\n"
        response = web.Response(status=status, text=text, content_type="text/plain",
                                headers={"Server": SERVER_NAME})
        response.force_close()
        return response


class EdgeServer(web_server.Server):
    """aiohttp's low-level server with the connection handler above."""

    def __init__(self, handler: Any, *, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.limits = limits

    def __call__(self) -> web_protocol.RequestHandler:
        return _EdgeProtocol(self, loop=self._loop, limits=self.limits, **self._kwargs)
