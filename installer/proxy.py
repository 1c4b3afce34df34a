"""The stack's single entry point: a reverse proxy with access control.

    /healthz     {"status": "ok"} or 503 {"status": "degraded"}; no credentials, nothing else revealed
    /service/... metadata service, "/service" stripped (writes included: the Metaflow client posts here)
    /api/...     UI backend, prefix kept (it runs with PATH_PREFIX=/api); /api/ws websockets relayed
    /s3/...      the object store (with --s3-socket), "/s3" stripped; AWS SigV4 instead of the token
    /...         the UI bundle from --static-dir; client-side routes fall back to index.html

Run as its own long-lived process (the stack supervisor spawns it):

    python -m installer.proxy --listen-host 127.0.0.1 --listen-port 7860 \\
        --metadata-url http://127.0.0.1:8080 --ui-backend-url http://127.0.0.1:8083 \\
        --static-dir DIR --token-file PATH [--no-auth] \\
        [--s3-socket PATH [--s3-internal-secret-file PATH]]

Why aiohttp: one library gives the server, the client with a shared connection
pool, and websockets on both sides, all on one event loop, so a request body or
a websocket frame goes from one socket to the other without threads or
buffering, and a client that goes away cancels the upstream call.

Access control (on unless --no-auth, which is refused on non-loopback addresses):
- The token lives in a 0600 file, re-read whenever the file changes, so rotating
  it needs no restart. Losing the file denies everyone (fail closed).
- API clients send it as header `x-api-key` (what METAFLOW_SERVICE_AUTH_KEY sends);
  it is removed before the request goes upstream.
- Browsers open `/?token=...` once, get a cookie and a redirect to the same URL
  without the token. The cookie holds an HMAC of the token, never the token, so
  rotating the token logs every browser out. It is HttpOnly, Secure behind https,
  and SameSite=Lax: Strict would drop the cookie on the very redirect that follows
  a link opened from a notebook (another site), leaving the user on the login page.
  Lax still withholds it from cross-site subrequests, posts and websockets; on top,
  cookie-authenticated websockets and writes must carry a same-origin Origin,
  because sibling tunnel hosts may count as the same site.
- Failed attempts from one client are answered after a delay that grows with
  recent failures (bounded, decaying, asyncio.sleep: the loop keeps serving).
- Tokens never reach the log: the access log redacts token-like query
  parameters and no header is logged.
- `/s3/` is for S3 clients (boto3, Metaflow's datastore), which cannot send the
  token: there a request must be signed (AWS SigV4, header or presigned URL)
  with the credentials derived from the token, or the stack-internal pair
  (installer/s3auth.py); anything else gets S3's 403 XML. The signature covers
  the Host as received, i.e. the public host name behind the tunnel.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import html
import ipaddress
import logging
import os
import signal
import sys
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlencode, urlsplit

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from multidict import CIMultiDict
from yarl import URL

from . import procs
from .errors import ConfigError, StackError
from .s3auth import CredentialSource, S3AuthError
from .s3auth import verify as verify_sigv4
from .secrets import read_or_create_secret, read_secret

__all__ = ["API_KEY_HEADER", "COOKIE_NAME", "ProxyConfig", "build_app", "cookie_value", "main", "serve"]

log = logging.getLogger("installer.proxy")
access_log = logging.getLogger("installer.proxy.access")

COOKIE_NAME = "mf_stack_session"
API_KEY_HEADER = "x-api-key"
HOW_TO_AUTHENTICATE = ("send header x-api-key: <token> (METAFLOW_SERVICE_AUTH_KEY) "
                       "or open /?token=<token> in a browser")

_COOKIE_MAX_AGE = 30 * 24 * 3600
_COOKIE_CONTEXT = b"metaflow-stack proxy session v1"
_IMMUTABLE = "public, max-age=31536000, immutable"
_WS_MAX_MESSAGE = 64 * 1024 * 1024
_HEALTH_CACHE_S = 1.0
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_REDACTED_PARAMS = frozenset({"token", "access_token", "api_key", "apikey", "x-api-key", "key", "password",
                              "x-amz-signature", "x-amz-security-token"})
S3_PREFIX = "/s3"

# Hop-by-hop headers (RFC 9110 7.6.1) and the ones this proxy sets itself.
_HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade",
    "proxy-connection", "proxy-authenticate", "proxy-authorization",
})
_NOT_FORWARDED_REQUEST = frozenset({"host", "expect", API_KEY_HEADER, "x-forwarded-for",
                                    "x-forwarded-proto", "x-forwarded-host"})
_WS_HANDSHAKE = frozenset({"sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions",
                           "sec-websocket-protocol", "sec-websocket-accept"})
# A missing file under these suffixes is a 404, not the UI's index.html.
_ASSET_SUFFIXES = frozenset({".js", ".mjs", ".css", ".map", ".json", ".png", ".jpg", ".jpeg", ".gif",
                             ".svg", ".ico", ".webp", ".woff", ".woff2", ".ttf", ".otf", ".eot", ".txt",
                             ".wasm", ".webmanifest", ".xml"})


@dataclass(frozen=True)
class ProxyConfig:
    listen_host: str
    listen_port: int
    metadata_url: str
    ui_backend_url: str
    static_dir: Path
    token_file: Path | None = None  # required unless no_auth
    no_auth: bool = False
    connect_timeout: float = 5.0
    read_timeout: float = 600.0  # longest silence allowed from an upstream mid-response
    max_line_size: int = 16 * 1024
    max_field_size: int = 16 * 1024
    max_headers: int = 128
    pool_size: int = 100
    failure_delay_base: float = 0.05
    failure_delay_cap: float = 2.0
    failure_allowance: int = 3
    shutdown_timeout: float = 3.0
    s3_socket: Path | None = None              # the object store's unix socket; None: no /s3 route
    s3_internal_secret_file: Path | None = None
    s3_max_body: int = 512 * 1024 * 1024       # one request's body (multipart parts are far smaller)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _upstream_base(url: str, what: str) -> URL:
    parsed = URL(url)
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ConfigError(f"{what} URL must look like http://HOST:PORT, not {url!r}")
    return parsed.with_path(parsed.path.rstrip("/")).with_query(None).with_fragment(None)


def validate(config: ProxyConfig) -> None:
    """Raise ConfigError for a configuration the proxy must not run with."""
    if config.no_auth and not _is_loopback(config.listen_host):
        raise ConfigError(
            f"refusing to serve without access control on {config.listen_host}: "
            "anyone who can reach that address could read and write all run data",
            hint="drop --no-auth (use the token), or listen on 127.0.0.1")
    if not config.no_auth and config.token_file is None:
        raise ConfigError("no token file given", hint="pass --token-file PATH (it is created if missing)")
    if not Path(config.static_dir).is_dir():
        raise ConfigError(f"UI files not found: {config.static_dir} is not a folder",
                          hint="point --static-dir at the UI bundle (the folder holding index.html)")
    _upstream_base(config.metadata_url, "metadata service")
    _upstream_base(config.ui_backend_url, "UI backend")


def cookie_value(token: str) -> str:
    """The session cookie a browser holds for `token`: an HMAC, so the token itself never sits in a cookie."""
    return hmac.new(token.encode(), _COOKIE_CONTEXT, hashlib.sha256).hexdigest()


class TokenSource:
    """The current token, re-read when the token file changes (stat per check; a read only on change)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._stamp: tuple[int, int, int] | None = None
        self._token: str | None = None
        self._cookie: str | None = None
        self._complained = False

    def current(self) -> tuple[str | None, str | None]:
        """(token, expected cookie value); (None, None) when there is no usable token: deny all."""
        try:
            info = os.stat(self.path)
        except OSError:
            self._forget("the token file is missing")
            return None, None
        stamp = (info.st_mtime_ns, info.st_ino, info.st_size)
        if stamp != self._stamp:
            try:
                token = read_secret(self.path)
            except StackError as exc:
                self._forget(exc.message)
                return None, None
            self._stamp, self._token, self._cookie = stamp, token, cookie_value(token)
            if self._complained:
                log.warning("token file %s is usable again", self.path)
            self._complained = False
            log.info("token loaded from %s", self.path)
        return self._token, self._cookie

    def _forget(self, why: str) -> None:
        self._stamp = self._token = self._cookie = None
        if not self._complained:
            log.error("denying every request: %s (%s)", why, self.path)
            self._complained = True


class FailureThrottle:
    """Per-client delay for failed authentication: a leaky bucket, bounded in size and in delay."""

    def __init__(self, base: float, cap: float, allowance: int, leak_per_s: float = 1.0,
                 max_clients: int = 10_000) -> None:
        self.base, self.cap, self.allowance = base, cap, allowance
        self.leak_per_s = leak_per_s
        self.max_clients = max_clients
        self._scores: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def _score(self, client: str, now: float) -> float:
        score, seen = self._scores.get(client, (0.0, now))
        return max(0.0, score - (now - seen) * self.leak_per_s)

    def fail(self, client: str) -> float:
        """Count one failure and return how long to wait before answering it."""
        now = time.monotonic()
        score = self._score(client, now) + 1.0
        self._scores[client] = (score, now)
        self._scores.move_to_end(client)
        while len(self._scores) > self.max_clients:
            self._scores.popitem(last=False)
        excess = score - self.allowance
        if excess <= 0:
            return 0.0
        return min(self.cap, self.base * (2.0 ** (excess - 1)))


def _client_key(request: web.BaseRequest) -> str:
    peer = request.remote or "?"
    # Behind the tunnel every request comes from loopback; the tunnel names the real client last.
    if _is_loopback(peer):
        forwarded = request.headers.get("X-Forwarded-For")
        if forwarded:
            return forwarded.rsplit(",", 1)[-1].strip() or peer
    return peer


def _scheme(request: web.BaseRequest) -> str:
    proto = request.headers.get("X-Forwarded-Proto", "").split(",", 1)[0].strip().lower()
    return proto if proto in ("http", "https") else request.scheme


def _safe_target(request: web.BaseRequest) -> str:
    """Path and query for the log, with token-like parameter values removed."""
    raw = request.raw_path
    path, _, query = raw.partition("?")
    if not query:
        return path
    pairs = []
    for item in query.split("&"):
        name, sep, _value = item.partition("=")
        if unquote(name).lower() in _REDACTED_PARAMS:
            pairs.append(f"{name}{sep}REDACTED")
        else:
            pairs.append(item)
    return f"{path}?{'&'.join(pairs)}"


class _AccessLogger(AbstractAccessLogger):
    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info('%s "%s %s" %s %s %.1fms', request.remote, request.method, _safe_target(request),
                         response.status, response.body_length, time * 1000)

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)


def _json(status: int, body: dict, headers: dict[str, str] | None = None) -> web.Response:
    response = web.json_response(body, status=status, headers=headers)
    response.headers["Cache-Control"] = "no-store"
    return response


def _connection_named(headers: Iterable[tuple[str, str]]) -> set[str]:
    named: set[str] = set()
    for name, value in headers:
        if name.lower() == "connection":
            named.update(part.strip().lower() for part in value.split(",") if part.strip())
    return named


def _strip_session_cookie(value: str) -> str:
    kept = [part for part in value.split(";") if part.split("=", 1)[0].strip() != COOKIE_NAME]
    return ";".join(kept).strip()


def _request_headers(request: web.BaseRequest, *, websocket: bool = False) -> CIMultiDict[str]:
    """Headers for the upstream request: end-to-end ones only, no credential of ours, X-Forwarded-* set."""
    items = list(request.headers.items())
    drop = _HOP_BY_HOP | _NOT_FORWARDED_REQUEST | _connection_named(items)
    if websocket:
        drop = drop | _WS_HANDSHAKE
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in items:
        lowered = name.lower()
        if lowered in drop:
            continue
        if lowered == "cookie":
            value = _strip_session_cookie(value)
            if not value:
                continue
        out.add(name, value)
    peer = request.remote or ""
    previous = request.headers.getall("X-Forwarded-For", [])
    out["X-Forwarded-For"] = ", ".join([*previous, peer]) if peer else ", ".join(previous)
    if not out["X-Forwarded-For"]:
        del out["X-Forwarded-For"]
    out["X-Forwarded-Proto"] = _scheme(request)
    out["X-Forwarded-Host"] = request.headers.get("X-Forwarded-Host") or request.host
    return out


def _response_headers(upstream: aiohttp.ClientResponse) -> CIMultiDict[str]:
    items = list(upstream.headers.items())
    drop = _HOP_BY_HOP | _connection_named(items)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in items:
        if name.lower() not in drop:
            out.add(name, value)
    return out


@dataclass(frozen=True)
class _Upstream:
    name: str       # as a person says it: "metadata service"
    base: URL
    health_path: str

    @property
    def where(self) -> str:
        return f"{self.base.host}:{self.base.port}"

    def url(self, raw_path_and_query: str) -> URL:
        return URL(str(self.base) + raw_path_and_query, encoded=True)

    def down(self) -> web.Response:
        return _json(502, {"error": f"{self.name} is not answering on {self.where}"})


_LOGIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Metaflow: sign in</title>
<style>
body{{font-family:system-ui,sans-serif;background:#f5f6f8;margin:0;display:flex;min-height:100vh;align-items:center;justify-content:center}}
main{{background:#fff;border:1px solid #dde;border-radius:8px;padding:2rem;max-width:28rem;width:90%}}
h1{{font-size:1.3rem;margin-top:0}} input{{width:100%;box-sizing:border-box;padding:.5rem;margin:.5rem 0 1rem;font-family:monospace}}
button{{padding:.5rem 1.2rem}} .error{{color:#b00020}} code{{background:#eef;padding:0 .2rem}}
</style></head>
<body><main id="login">
<h1>Metaflow: access token needed</h1>
{error}
<p>This Metaflow stack is protected. Paste its access token (shown by <code>python -m installer url</code>
on the machine that runs it).</p>
<form method="get" action="/" autocomplete="off">
<label for="token">Access token</label>
<input id="token" name="token" type="password" required autofocus>
<button type="submit">Open the UI</button>
</form>
</main></body></html>
"""


def _login_page(error: str | None = None) -> web.Response:
    note = f'<p class="error" id="error">{html.escape(error)}</p>' if error else ""
    response = web.Response(status=401, text=_LOGIN_PAGE.format(error=note), content_type="text/html")
    response.headers.update({
        "Cache-Control": "no-store",
        "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
                                   "frame-ancestors 'none'",
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "no-referrer",
        "X-Content-Type-Options": "nosniff",
    })
    return response


def _s3_error(status: int, code: str, message: str, resource: str, head: bool = False) -> web.Response:
    body = ('<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{html.escape(code)}</Code><Message>{html.escape(message)}</Message>"
            f"<Resource>{html.escape(resource)}</Resource></Error>")
    response = web.Response(status=status, body=None if head else body.encode(), content_type="application/xml")
    response.headers["Cache-Control"] = "no-store"
    return response


def _area(path: str) -> str:
    for prefix in ("/api", "/service"):
        if path == prefix or path.startswith(prefix + "/"):
            return prefix[1:]
    return "ui"


def _wants_html(request: web.BaseRequest) -> bool:
    return "text/html" in request.headers.get("Accept", "")


def _is_websocket(request: web.BaseRequest) -> bool:
    return (request.headers.get("Upgrade", "").lower() == "websocket"
            and "upgrade" in request.headers.get("Connection", "").lower())


def _same_origin(request: web.BaseRequest) -> bool:
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    netloc = urlsplit(origin).netloc.lower()
    if not netloc:
        return False
    own = {request.host.lower()}
    if request.headers.get("X-Forwarded-Host"):
        own.add(request.headers["X-Forwarded-Host"].split(",", 1)[0].strip().lower())
    return netloc in own


def _ws_close_code(code: int | None) -> int:
    # 1005/1006/1015 describe a missing close frame; they cannot be sent in one.
    if code is None or code == 1005:
        return 1000
    if code in (1006, 1015) or not (1000 <= code <= 4999):
        return 1001  # the other side went away without a proper close
    return code


class _Proxy:
    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self.static_root = Path(config.static_dir).resolve()
        self.metadata = _Upstream("metadata service", _upstream_base(config.metadata_url, "metadata service"),
                                  "/ping")
        self.ui = _Upstream("UI backend", _upstream_base(config.ui_backend_url, "UI backend"), "/api/ping")
        self.tokens = None if config.no_auth or config.token_file is None else TokenSource(Path(config.token_file))
        self.throttle = FailureThrottle(config.failure_delay_base, config.failure_delay_cap,
                                        config.failure_allowance)
        self.session: aiohttp.ClientSession | None = None
        self.s3: _Upstream | None = None
        self.s3_session: aiohttp.ClientSession | None = None
        if config.s3_socket is not None:
            self.s3 = _Upstream("object store", URL("http://objectstore"), "/")
            self.s3_credentials = CredentialSource(None if config.no_auth else config.token_file,
                                                   config.s3_internal_secret_file)
        self._health: tuple[float, bool] | None = None
        self._health_lock = asyncio.Lock()
        self._http_timeout = aiohttp.ClientTimeout(total=None, connect=None,
                                                   sock_connect=config.connect_timeout,
                                                   sock_read=config.read_timeout)

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self, app: web.Application) -> None:
        # Idle pooled connections are dropped before common upstream keep-alive limits (5 s) expire, so a
        # POST is never sent on a connection the upstream is closing (only idempotent requests are retried).
        connector = aiohttp.TCPConnector(limit=self.config.pool_size, limit_per_host=self.config.pool_size,
                                         ttl_dns_cache=300, keepalive_timeout=4.0)
        self.session = aiohttp.ClientSession(connector=connector, timeout=self._http_timeout,
                                             auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
                                             trust_env=False, raise_for_status=False)
        if self.config.s3_socket is not None:
            self.s3_session = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=str(self.config.s3_socket), limit=self.config.pool_size,
                                                keepalive_timeout=4.0),
                timeout=self._http_timeout, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
                trust_env=False, raise_for_status=False)

    async def stop(self, app: web.Application) -> None:
        if self.session is not None:
            await self.session.close()
        if self.s3_session is not None:
            await self.s3_session.close()

    # -- dispatch --------------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.raw_path.split("?", 1)[0]
        if not path.startswith("/"):
            # absolute-form ("GET http://host/...") and "*" targets are for forward proxies
            return _json(400, {"error": "request target must be a path"})
        if path == "/healthz":
            return await self.healthz(request)
        if self.s3 is not None and (path == S3_PREFIX or path.startswith(S3_PREFIX + "/")):
            return await self.s3_request(request)
        area = _area(path)
        if area == "ui" and "token" in request.query and request.method in ("GET", "HEAD"):
            return await self.token_login(request)
        how = await self.authenticate(request)
        if how is None:
            return self.deny(request, area)
        if how == "cookie" and (request.method not in _SAFE_METHODS or _is_websocket(request)) \
                and not _same_origin(request):
            return _json(403, {"error": "cross-origin request refused"})
        if area == "api":
            if _is_websocket(request):
                return await self.relay_websocket(request, self.ui)
            return await self.forward(request, self.ui, request.raw_path)
        if area == "service":
            rest = request.raw_path[len("/service"):]
            if not rest.startswith("/"):
                rest = "/" + rest
            return await self.forward(request, self.metadata, rest)
        return await self.static(request, path)

    # -- access control --------------------------------------------------------------------------

    def _valid_token(self, given: str, token: str | None) -> bool:
        if token is None:
            return False
        return hmac.compare_digest(given.encode("utf-8", "replace"), token.encode())

    async def authenticate(self, request: web.Request) -> str | None:
        """'key', 'cookie' or 'open' for an admitted request; None (after any penalty delay) otherwise."""
        if self.tokens is None:
            return "open"
        token, expected_cookie = self.tokens.current()
        given = request.headers.get(API_KEY_HEADER)
        if given is not None:
            if self._valid_token(given, token):
                return "key"
        else:
            cookie = request.cookies.get(COOKIE_NAME)
            if cookie is not None and expected_cookie is not None \
                    and hmac.compare_digest(cookie.encode("utf-8", "replace"), expected_cookie.encode()):
                return "cookie"
            if cookie is None:
                return None  # nothing was tried: no penalty for a first visit
        await self._penalise(request)
        return None

    async def _penalise(self, request: web.Request) -> None:
        delay = self.throttle.fail(_client_key(request))
        if delay > 0:
            await asyncio.sleep(delay)

    def deny(self, request: web.Request, area: str) -> web.Response:
        if area == "ui" and _wants_html(request):
            return _login_page()
        return _json(401, {"error": "authentication required: missing or invalid access token",
                           "how_to_authenticate": HOW_TO_AUTHENTICATE},
                     headers={"WWW-Authenticate": 'x-api-key realm="metaflow"'})

    async def token_login(self, request: web.Request) -> web.Response:
        if self.tokens is None:
            token, expected_cookie = None, None
        else:
            token, expected_cookie = self.tokens.current()
        given = request.query.get("token", "")
        clean_query = [(k, v) for k, v in request.query.items() if k != "token"]
        path = request.raw_path.split("?", 1)[0]
        if path.startswith(("//", "/\\")):
            path = "/"  # never let a crafted path turn the redirect into one to another host
        location = path + ("?" + urlencode(clean_query) if clean_query else "")
        if self.tokens is None:
            raise web.HTTPSeeOther(location=location, headers={"Referrer-Policy": "no-referrer"})
        if not self._valid_token(given, token) or expected_cookie is None:
            await self._penalise(request)
            return _login_page("That token is not valid for this stack (it may have been rotated).")
        response = web.Response(status=303, headers={"Location": location, "Cache-Control": "no-store",
                                                     "Referrer-Policy": "no-referrer"})
        response.set_cookie(COOKIE_NAME, expected_cookie, max_age=_COOKIE_MAX_AGE, path="/", httponly=True,
                            samesite="Lax", secure=_scheme(request) == "https")
        return response

    # -- health ----------------------------------------------------------------------------------

    async def _answers(self, upstream: _Upstream, session: aiohttp.ClientSession | None = None) -> bool:
        session = session or self.session
        assert session is not None
        try:
            async with session.get(upstream.url(upstream.health_path),
                                        timeout=aiohttp.ClientTimeout(total=3)) as response:
                await response.read()
                return response.status < 500
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return False

    async def healthz(self, request: web.Request) -> web.Response:
        # Cached briefly: an unauthenticated endpoint must not let anyone hammer the upstreams.
        async with self._health_lock:
            now = time.monotonic()
            if self._health is None or now - self._health[0] > _HEALTH_CACHE_S:
                checks = [self._answers(self.metadata), self._answers(self.ui)]
                if self.s3 is not None:
                    checks.append(self._answers(self.s3, self.s3_session))
                results = await asyncio.gather(*checks)
                self._health = (time.monotonic(), all(results))
            healthy = self._health[1]
        if healthy:
            return _json(200, {"status": "ok"})
        return _json(503, {"status": "degraded"})

    # -- HTTP forwarding -------------------------------------------------------------------------

    async def forward(self, request: web.Request, upstream: _Upstream, target: str,
                      session: aiohttp.ClientSession | None = None,
                      drop: Iterable[str] = ()) -> web.StreamResponse:
        session = session or self.session
        assert session is not None
        headers = _request_headers(request)
        for name in drop:
            headers.popall(name, None)
        body = request.content if request.body_exists else None
        try:
            upstream_response = await session.request(
                request.method, upstream.url(target), headers=headers, data=body, allow_redirects=False,
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
                compress=None, chunked=None)
        except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError) as exc:
            log.warning("%s unreachable at %s: %s", upstream.name, upstream.where, exc.__class__.__name__)
            return upstream.down()
        except (asyncio.TimeoutError, aiohttp.ServerTimeoutError):
            return _json(504, {"error": f"{upstream.name} on {upstream.where} did not answer in time"})
        except aiohttp.ClientPayloadError:
            return _json(400, {"error": "the request body ended early"})
        except aiohttp.ClientError as exc:
            log.warning("%s request failed: %s", upstream.name, exc.__class__.__name__)
            return upstream.down()
        async with upstream_response:
            content = upstream_response.content
            if content.is_eof() and request.method != "HEAD":
                # The whole body came in with the headers (small API answers): nothing to wait for,
                # and one write to the client instead of one for the headers and one for the body.
                return web.Response(status=upstream_response.status, reason=upstream_response.reason,
                                    headers=_response_headers(upstream_response), body=content.read_nowait(-1))
            response = web.StreamResponse(status=upstream_response.status, reason=upstream_response.reason,
                                          headers=_response_headers(upstream_response))
            await response.prepare(request)
            if request.method == "HEAD" or upstream_response.status in (204, 304):
                await response.write_eof()
                return response
            try:
                body = upstream_response.content
                async for chunk in body.iter_any():
                    if body.at_eof():
                        # The whole rest is here: one write carries headers, body and end together.
                        await response.write_eof(chunk)
                        return response
                    await response.write(chunk)
            except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, asyncio.TimeoutError,
                    aiohttp.ServerTimeoutError) as exc:
                # Headers are gone already: cut the connection so the client sees a truncated response.
                log.warning("%s broke off a response: %s", upstream.name, exc.__class__.__name__)
                if request.transport is not None:
                    request.transport.close()
                return response
            await response.write_eof()
            return response

    # -- object store ----------------------------------------------------------------------------

    async def s3_request(self, request: web.Request) -> web.StreamResponse:
        """An S3 request: admitted by its SigV4 signature (not the token), then relayed without "/s3"."""
        assert self.s3 is not None
        raw_path, _, raw_query = request.raw_path.partition("?")
        head = request.method == "HEAD"
        if not self.config.no_auth:
            try:
                verify_sigv4(request.method, raw_path, raw_query, request.headers, self.s3_credentials)
            except S3AuthError as exc:
                if exc.status == 403:
                    await self._penalise(request)
                return _s3_error(exc.status, exc.code, exc.message, raw_path, head)
        if (request.content_length or 0) > self.config.s3_max_body:
            return _s3_error(400, "EntityTooLarge", f"one request may carry at most {self.config.s3_max_body} "
                             "bytes; upload larger objects in parts (multipart upload)", raw_path, head)
        rest = request.raw_path[len(S3_PREFIX):]
        if not rest.startswith("/"):
            rest = "/" + rest
        return await self.forward(request, self.s3, rest, session=self.s3_session, drop=("authorization",))

    # -- websockets ------------------------------------------------------------------------------

    async def relay_websocket(self, request: web.Request, upstream: _Upstream) -> web.StreamResponse:
        assert self.session is not None
        offered = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
        try:
            upstream_ws = await self.session.ws_connect(
                upstream.url(request.raw_path), headers=_request_headers(request, websocket=True),
                protocols=offered, autoping=True, max_msg_size=_WS_MAX_MESSAGE,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=5.0))
        except aiohttp.WSServerHandshakeError as exc:
            return _json(exc.status if 400 <= exc.status < 600 else 502,
                         {"error": f"{upstream.name} refused the websocket ({exc.status})"})
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return upstream.down()
        client_ws = web.WebSocketResponse(protocols=[upstream_ws.protocol] if upstream_ws.protocol else (),
                                          autoping=True, heartbeat=30.0, max_msg_size=_WS_MAX_MESSAGE)
        try:
            await client_ws.prepare(request)
        except Exception:
            await upstream_ws.close()
            raise

        relay = asyncio.ensure_future(self._relay(client_ws, upstream_ws))
        try:
            # Shielded: when the browser's connection drops, the handler is cancelled, but the relay
            # must still pass the browser's close code on to the upstream and close it cleanly.
            await asyncio.shield(relay)
        except asyncio.CancelledError:
            await asyncio.wait({relay}, timeout=5.0)
            relay.cancel()
            raise
        return client_ws

    @staticmethod
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

    # -- static UI -------------------------------------------------------------------------------

    def _resolve_static(self, path: str) -> Path | None:
        """The file under the static root for a raw request path, or None. Never leaves the root."""
        lowered = path.lower()
        if "\\" in path or "%2f" in lowered or "%5c" in lowered or "%00" in lowered:
            return None
        segments = []
        for part in path.split("/"):
            if not part:
                continue
            name = unquote(part, errors="strict")
            if name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
                return None
            segments.append(name)
        candidate = self.static_root.joinpath(*segments) if segments else self.static_root
        try:
            resolved = candidate.resolve(strict=True)
        except (OSError, RuntimeError):
            return None
        if resolved != self.static_root and self.static_root not in resolved.parents:
            return None  # a symlink pointing out of the bundle
        if resolved.is_dir():
            resolved = resolved / "index.html"
            if not resolved.is_file():
                return None
        return resolved if resolved.is_file() else None

    async def static(self, request: web.Request, path: str) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD"):
            return _json(405, {"error": f"{request.method} is not allowed on the UI"})
        try:
            found = self._resolve_static(path)
        except UnicodeDecodeError:
            found = None
        if found is None:
            last = path.rsplit("/", 1)[-1]
            if not self._plain_route(path) or path.startswith("/static/") \
                    or Path(unquote(last)).suffix.lower() in _ASSET_SUFFIXES:
                return _json(404, {"error": "not found"})
            found = self.static_root / "index.html"
            if not found.is_file():
                return _json(404, {"error": "the UI bundle has no index.html"})
        immutable = path.startswith("/static/") and found.name != "index.html"
        headers = {"Cache-Control": _IMMUTABLE if immutable else "no-cache",
                   "X-Content-Type-Options": "nosniff"}
        return web.FileResponse(found, headers=headers)

    @staticmethod
    def _plain_route(path: str) -> bool:
        """True for a path that may stand for a client-side route (no traversal or encoding tricks)."""
        lowered = path.lower()
        if "\\" in path or "%2f" in lowered or "%5c" in lowered or "%00" in lowered or "%2e" in lowered:
            return False
        return all(part not in (".", "..") for part in path.split("/"))


def build_app(config: ProxyConfig) -> web.Application:
    """The proxy as an aiohttp application (raises ConfigError for an unsafe or broken configuration)."""
    validate(config)
    if config.token_file is not None and not config.no_auth:
        read_or_create_secret(Path(config.token_file))
    proxy = _Proxy(config)
    app = web.Application(client_max_size=1024 ** 2)
    app.on_startup.append(proxy.start)
    app.on_cleanup.append(proxy.stop)
    app.router.add_route("*", "/{tail:.*}", proxy.handle)
    return app


def _runner(app: web.Application, config: ProxyConfig) -> web.AppRunner:
    return web.AppRunner(app, handle_signals=False, access_log_class=_AccessLogger, access_log=access_log,
                         handler_cancellation=True, max_line_size=config.max_line_size,
                         max_field_size=config.max_field_size, max_headers=config.max_headers,
                         shutdown_timeout=config.shutdown_timeout)


async def _serve(config: ProxyConfig) -> None:
    app = build_app(config)
    runner = _runner(app, config)
    await runner.setup()
    site = web.TCPSite(runner, config.listen_host, config.listen_port, backlog=512, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise StackError(f"the proxy cannot listen on {config.listen_host}:{config.listen_port}: {exc.strerror}",
                         hint="another program holds the port; stop it or choose another port") from exc
    if config.no_auth:
        log.warning("!" * 72)
        log.warning("ACCESS CONTROL IS OFF (--no-auth): anyone who reaches %s:%s can read and WRITE all "
                    "run data. Use this only on a machine nobody else can reach.",
                    config.listen_host, config.listen_port)
        log.warning("!" * 72)
    log.info("proxy listening on http://%s:%s (metadata service %s, UI backend %s, UI files %s)",
             config.listen_host, config.listen_port, config.metadata_url, config.ui_backend_url, config.static_dir)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        log.info("stopping")
    finally:
        await runner.cleanup()


def serve(config: ProxyConfig) -> None:
    """Run the proxy until SIGTERM or SIGINT."""
    try:
        import uvloop  # optional: a faster event loop where it is installed
        run = getattr(uvloop, "run", asyncio.run)
    except ImportError:
        run = asyncio.run
    run(_serve(config))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m installer.proxy",
                                     description="Reverse proxy with access control in front of the Metaflow "
                                                 "metadata service, UI backend and UI files.")
    parser.add_argument("--listen-host", default="127.0.0.1")
    parser.add_argument("--listen-port", type=int, default=7860)
    parser.add_argument("--metadata-url", default="http://127.0.0.1:8080")
    parser.add_argument("--ui-backend-url", default="http://127.0.0.1:8083")
    parser.add_argument("--static-dir", required=True, type=Path, help="folder with the UI bundle (index.html)")
    parser.add_argument("--token-file", type=Path, help="0600 file holding the access token (created if missing)")
    parser.add_argument("--s3-socket", type=Path, help="the object store's unix socket: serve it under /s3/")
    parser.add_argument("--s3-internal-secret-file", type=Path,
                        help="0600 file with the stack-internal S3 secret (also accepted on /s3/)")
    parser.add_argument("--no-auth", action="store_true",
                        help="no access control; refused unless listening on a loopback address")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: returns the exit status."""
    args = _parser().parse_args(argv)
    config = ProxyConfig(listen_host=args.listen_host, listen_port=args.listen_port,
                         metadata_url=args.metadata_url, ui_backend_url=args.ui_backend_url,
                         static_dir=args.static_dir, token_file=args.token_file,
                         no_auth=args.no_auth, s3_socket=args.s3_socket,
                         s3_internal_secret_file=args.s3_internal_secret_file)
    return procs.service_main(lambda: serve(config), quiet=["aiohttp"])


if __name__ == "__main__":
    sys.exit(main())
