"""Relaying an admitted HTTP request to an upstream, and what of it is relayed.

Sent upstream: the method, the raw target, end-to-end headers minus our
credentials (x-api-key, the session cookie) and minus every client-supplied
X-Forwarded-* (the proxy sets its own: the client address as the access gate saw
it, the scheme, the Host); the body exactly as framed by the client (Content-Length
bytes, or chunks re-framed as chunks). Sent back: the status and end-to-end headers
minus Set-Cookie (an upstream must not plant cookies on the stack's origin),
Access-Control-* (nor open it to other sites) and Server (ours replaces it).

The HTTP client is client.py's: a pooled upstream connection is reused only after
a clean, complete, non-error exchange: any exception, and any error status, closes
it, so a connection the upstream may read differently than we wrote it never
carries another client's request.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from .access import API_KEY_HEADER, COOKIE_NAME, Client
from .client import BodyError, Pool, UpstreamError, UpstreamResponse, UpstreamTimeout, UpstreamUnreachable
from .pages import SERVER_NAME, json_error

__all__ = ["SKIP_AUTO_HEADERS", "Upstream", "forward", "request_headers"]

log = logging.getLogger("installer.proxy")

# Hop-by-hop headers (RFC 9110 7.6.1) and the ones this proxy sets itself.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade",
    "proxy-connection", "proxy-authenticate", "proxy-authorization",
})
# Content-Length too: the client sends the length of the body as the server's parser admitted it.
_NOT_FORWARDED_REQUEST = frozenset({"host", "expect", "content-length", API_KEY_HEADER, "x-forwarded-for", "x-forwarded-proto",
                                    "x-forwarded-host", "x-forwarded-port", "x-real-ip", "forwarded",
                                    "cf-connecting-ip"})
_NOT_FORWARDED_RESPONSE = frozenset({"set-cookie", "set-cookie2", "server"})
WS_HANDSHAKE = frozenset({"sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions",
                          "sec-websocket-protocol", "sec-websocket-accept"})
_DROP_REQUEST = HOP_BY_HOP | _NOT_FORWARDED_REQUEST
_DROP_RESPONSE = HOP_BY_HOP | _NOT_FORWARDED_RESPONSE
# Set on the websocket session: the client's own headers go upstream as sent, nothing of aiohttp's added.
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
                    keep: Iterable[str] = ()) -> list[tuple[str, str]]:
    """Headers for the upstream request: end-to-end ones only, no credential of ours, X-Forwarded-* ours."""
    headers = request.headers
    drop = _DROP_REQUEST
    if "Connection" in headers:
        drop = drop | _connection_named(headers.items())
    if keep:
        drop = drop - set(keep)
    if websocket:
        drop = drop | WS_HANDSHAKE
    out: list[tuple[str, str]] = []
    for name, value in headers.items():
        lowered = name.lower()
        if lowered in drop:
            continue
        if lowered == "cookie":
            value = _strip_session_cookie(value)
            if not value:
                continue
        out.append((name, value))
    out.append(("X-Forwarded-For", client.address))
    out.append(("X-Forwarded-Proto", client.scheme))
    out.append(("X-Forwarded-Host", request.host))
    return out


def _response_headers(headers: list[tuple[str, str]]) -> CIMultiDict[str]:
    drop = _DROP_RESPONSE
    for name, _ in headers:
        if name.lower() == "connection":
            drop = drop | _connection_named(headers)
            break
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers:
        lowered = name.lower()
        # CORS too: the UI is served from this origin, and no upstream may open the stack to other sites
        # (the object store echoes any Origin it is sent).
        if lowered not in drop and not lowered.startswith("access-control-"):
            out.add(name, value)
    out["Server"] = SERVER_NAME
    return out


async def forward(request: web.BaseRequest, upstream: Upstream, target: str, pool: Pool,
                  headers: list[tuple[str, str]]) -> web.StreamResponse:
    """Send the request to `upstream` at `target` (raw path and query) and stream its answer back."""
    body, length = None, None
    if request.body_exists:
        body = request.content.iter_any()
        length = None if "Transfer-Encoding" in request.headers else request.content_length
    try:
        upstream_response = await pool.request(request.method, target, headers, body, length)
    except UpstreamTimeout:
        return json_error(504, f"{upstream.name} on {upstream.where} did not answer in time")
    except UpstreamUnreachable as exc:
        log.warning("%s unreachable at %s: %s", upstream.name, upstream.where, exc)
        return upstream.down()
    except UpstreamError as exc:
        log.warning("%s request failed: %s", upstream.name, exc)
        return upstream.down()
    except BodyError:
        return json_error(400, "the request body ended early")
    try:
        return await _relay_response(request, upstream, upstream_response)
    finally:
        upstream_response.finish()  # back into the pool only after a clean, complete, non-error exchange


async def _relay_response(request: web.BaseRequest, upstream: Upstream,
                          upstream_response: UpstreamResponse) -> web.StreamResponse:
    headers = _response_headers(upstream_response.headers)
    if upstream_response.body is not None and request.method != "HEAD":
        # The whole body came in with the head (small API answers): one write to the client.
        return web.Response(status=upstream_response.status, reason=upstream_response.reason,
                            headers=headers, body=upstream_response.body)
    response = web.StreamResponse(status=upstream_response.status, reason=upstream_response.reason,
                                  headers=headers)
    await response.prepare(request)
    if request.method == "HEAD" or upstream_response.status in (204, 304):
        await response.write_eof()
        return response
    try:
        async for chunk in upstream_response.chunks():
            await response.write(chunk)
    except UpstreamError as exc:
        # Headers are gone already: cut the connection so the client sees a truncated response.
        log.warning("%s broke off a response: %s", upstream.name, exc.__class__.__name__)
        if request.transport is not None:
            request.transport.close()
        return response
    await response.write_eof()
    return response


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
