"""Relaying an admitted HTTP request to an upstream, and what of it is relayed.

Sent upstream: the method, the raw target, end-to-end headers minus our
credentials (x-api-key, the session cookie) and minus every client-supplied
X-Forwarded-* (the proxy sets its own: the client address as the access gate saw
it, the scheme, the Host); the body exactly as framed by the client, re-framed by
the HTTP client. Sent back: the status and end-to-end headers minus Set-Cookie
(an upstream must not plant cookies on the stack's origin) and Server.

A pooled upstream connection is reused only after a clean, complete, non-error
exchange: any exception, and any error status, closes it, so a connection the
upstream may read differently than we wrote it never carries another client's
request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from .access import API_KEY_HEADER, COOKIE_NAME, Client
from .pages import json_error

__all__ = ["SKIP_AUTO_HEADERS", "Upstream", "forward", "request_headers"]

log = logging.getLogger("installer.proxy")

# Hop-by-hop headers (RFC 9110 7.6.1) and the ones this proxy sets itself.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade",
    "proxy-connection", "proxy-authenticate", "proxy-authorization",
})
_NOT_FORWARDED_REQUEST = frozenset({"host", "expect", API_KEY_HEADER, "x-forwarded-for", "x-forwarded-proto",
                                    "x-forwarded-host", "x-forwarded-port", "x-real-ip", "forwarded",
                                    "cf-connecting-ip"})
_NOT_FORWARDED_RESPONSE = frozenset({"set-cookie", "set-cookie2", "server"})
WS_HANDSHAKE = frozenset({"sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions",
                          "sec-websocket-protocol", "sec-websocket-accept"})
_DROP_REQUEST = HOP_BY_HOP | _NOT_FORWARDED_REQUEST
_DROP_RESPONSE = HOP_BY_HOP | _NOT_FORWARDED_RESPONSE
# Set once on the upstream sessions: the client's own headers go upstream as sent, nothing of aiohttp's added.
SKIP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


@dataclass(frozen=True)
class Upstream:
    name: str       # as a person says it: "metadata service"
    base: URL
    health_path: str
    _prefix: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_prefix", str(self.base))  # str(URL) is rebuilt on every call

    @property
    def where(self) -> str:
        return f"{self.base.host}:{self.base.port}"

    def url(self, raw_path_and_query: str) -> URL:
        return URL(self._prefix + raw_path_and_query, encoded=True)

    def down(self) -> web.Response:
        return json_error(502, f"{self.name} is not answering on {self.where}")


def _connection_named(headers: Iterable[tuple[str, str]]) -> set[str]:
    named: set[str] = set()
    for name, value in headers:
        if name.lower() == "connection":
            named.update(part.strip().lower() for part in value.split(",") if part.strip())
    return named


def _strip_session_cookie(value: str) -> str:
    kept = [part for part in value.split(";") if part.split("=", 1)[0].strip() != COOKIE_NAME]
    return ";".join(kept).strip()


def request_headers(request: web.BaseRequest, client: Client, *, websocket: bool = False,
                    keep: Iterable[str] = ()) -> CIMultiDict[str]:
    """Headers for the upstream request: end-to-end ones only, no credential of ours, X-Forwarded-* ours."""
    headers = request.headers
    drop = _DROP_REQUEST
    if "Connection" in headers:
        drop = drop | _connection_named(headers.items())
    if keep:
        drop = drop - set(keep)
    if websocket:
        drop = drop | WS_HANDSHAKE
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lowered = name.lower()
        if lowered in drop:
            continue
        if lowered == "cookie":
            value = _strip_session_cookie(value)
            if not value:
                continue
        out.add(name, value)
    out["X-Forwarded-For"] = client.address
    out["X-Forwarded-Proto"] = client.scheme
    out["X-Forwarded-Host"] = request.host
    return out


def _response_headers(upstream: aiohttp.ClientResponse) -> CIMultiDict[str]:
    headers = upstream.headers
    drop = _DROP_RESPONSE
    if "Connection" in headers:
        drop = drop | _connection_named(headers.items())
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        if name.lower() not in drop:
            out.add(name, value)
    return out


async def forward(request: web.BaseRequest, upstream: Upstream, target: str, session: aiohttp.ClientSession,
                  headers: CIMultiDict[str]) -> web.StreamResponse:
    """Send the request to `upstream` at `target` (raw path and query) and stream its answer back."""
    body = request.content if request.body_exists else None
    try:
        upstream_response = await session.request(
            request.method, upstream.url(target), headers=headers, data=body, allow_redirects=False,
            compress=None, chunked=None)
    except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError) as exc:
        log.warning("%s unreachable at %s: %s", upstream.name, upstream.where, exc.__class__.__name__)
        return upstream.down()
    except (asyncio.TimeoutError, aiohttp.ServerTimeoutError):
        return json_error(504, f"{upstream.name} on {upstream.where} did not answer in time")
    except aiohttp.ClientPayloadError:
        return json_error(400, "the request body ended early")
    except aiohttp.ClientError as exc:
        log.warning("%s request failed: %s", upstream.name, exc.__class__.__name__)
        return upstream.down()
    clean = False
    try:
        response, clean = await _relay_response(request, upstream, upstream_response)
        return response
    finally:
        if not clean or upstream_response.status >= 400:
            upstream_response.close()  # never back into the pool
        else:
            upstream_response.release()


async def _relay_response(request: web.BaseRequest, upstream: Upstream,
                          upstream_response: aiohttp.ClientResponse) -> tuple[web.StreamResponse, bool]:
    content = upstream_response.content
    headers = _response_headers(upstream_response)
    if content.is_eof() and request.method != "HEAD":
        # The whole body came in with the headers (small API answers): nothing to wait for,
        # and one write to the client instead of one for the headers and one for the body.
        return web.Response(status=upstream_response.status, reason=upstream_response.reason,
                            headers=headers, body=content.read_nowait(-1)), True
    response = web.StreamResponse(status=upstream_response.status, reason=upstream_response.reason,
                                  headers=headers)
    await response.prepare(request)
    if request.method == "HEAD" or upstream_response.status in (204, 304):
        await response.write_eof()
        return response, True
    try:
        async for chunk in content.iter_any():
            if content.at_eof():
                # The whole rest is here: one write carries headers, body and end together.
                await response.write_eof(chunk)
                return response, True
            await response.write(chunk)
    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, asyncio.TimeoutError,
            aiohttp.ServerTimeoutError) as exc:
        # Headers are gone already: cut the connection so the client sees a truncated response.
        log.warning("%s broke off a response: %s", upstream.name, exc.__class__.__name__)
        if request.transport is not None:
            request.transport.close()
        return response, False
    await response.write_eof()
    return response, True


async def send_continue(request: web.BaseRequest) -> web.Response | None:
    """Answer `Expect: 100-continue` (call only once the request is admitted); a refusal for other Expects."""
    expect = request.headers.get("Expect")
    if expect is None:
        return None
    if expect.strip().lower() != "100-continue":
        return json_error(417, f"Expect: {expect[:40]} is not supported")
    if request.version >= (1, 1) and request.body_exists:
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    return None
