"""The entry point as a process: what admits a request, in order, and where it goes.

For every request, in this order (each step refuses with a clear message):
1. the connection: per-peer connection cap, head deadline, parseable HTTP (protocol.py);
2. the shape: a path target, not TRACE/TRACK/CONNECT (routes.py);
3. without access control: a loopback Host only (access.py);
4. /healthz: answered here, nothing revealed;
5. /s3/: the SigV4 gate (s3gate.py), which relays to the object store;
6. credentials: `?token=` login, x-api-key or the session cookie, checked at once; a
   failure goes through the failure throttle (access.py); cookie and open sessions:
   same scheme, host and port in Origin (or Referer) for writes and websockets, and
   cookie writes must name one;
7. API routes: no dot segments or encoded separators, no body on GET/HEAD/OPTIONS,
   token-like query parameters removed, `100 Continue` only now; then forward.py or
   websocket.py;
8. the UI files (static.py).
A refused request that declared a body is answered with `Connection: close` and
its body is not read (no lingering): the client's bytes go nowhere. The access
line of a request no credential admitted passes the rate limit of quiet.py.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from pathlib import Path
from urllib.parse import urlencode

import aiohttp
from aiohttp import web
from yarl import URL
from aiohttp.abc import AbstractAccessLogger

from .. import procs
from ..errors import StackError
from ..s3auth import INTERNAL_ACCESS_KEY_ID, CredentialSource, secret_for_token
from ..secrets import read_or_create_secret
from .access import (COOKIE_MAX_AGE, COOKIE_NAME, REFUSAL, SAFE_METHODS, Client, FailureThrottle, Gate, InFlight,
                     TokenSource, is_websocket, loopback_host, same_origin)
from .config import ProxyConfig, upstream_base, validate
from .client import Pool, UpstreamError
from .forward import SKIP_AUTO_HEADERS, Upstream, forward, request_headers, send_continue
from .pages import HOW_TO_AUTHENTICATE, SERVER_NAME, json_error, json_response, login_page, ui_starting_page
from .protocol import ConnectionLimits, EdgeServer
from .logbuffer import BufferedHandler, buffer_root_handlers, direct_handler
from .redact import Redactor, install
from .quiet import refusals
from .routes import PUBLIC_UI_FILES, area, body_problem, declares_body, method_problem, path_problem, scrub_target
from .s3gate import S3Gate
from .static import StaticFiles
from .websocket import relay_websocket

__all__ = ["Edge", "build_app", "configure_logging", "main", "serve"]

log = logging.getLogger("installer.proxy")
access_log = logging.getLogger("installer.proxy.access")

_HEALTH_CACHE_S = 1.0
ADMITTED = "mfstack.admitted"   # request key: credentials admitted it (or there is no access control)
VISITOR = "mfstack.visitor"     # request key: the visitor's address the tunnel reported


class _AccessLogger(AbstractAccessLogger):
    # Set once logging is configured: the buffered handler the line may go to without a LogRecord.
    direct: BufferedHandler | None = None

    # The raw target goes in as sent: the redaction of the log handlers removes credentials.
    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        message = (f'{request.get(VISITOR) or request.remote} "{request.method} {request.raw_path}" '
                   f'{response.status} {response.body_length} {time * 1000:.1f}ms')
        if not request.get(ADMITTED):
            # Nobody vouched for this request: its line is rate-limited and short (quiet.py).
            why = request.get(REFUSAL)
            if not refusals.allow():
                return
            message = refusals.text(f"{message} ({why})" if why else message)
        direct = self.direct
        if direct is not None:
            direct.line(self.logger.name, logging.INFO, message)
        else:
            self.logger.info("%s", message)

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)


class Edge:
    """The request handler: admission in the order of the module docstring, then routing."""

    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self.static = StaticFiles(config.static_dir)
        self.metadata = Upstream("metadata service", upstream_base(config.metadata_url, "metadata service"),
                                 "/ping")
        self.ui = Upstream("UI backend", upstream_base(config.ui_backend_url, "UI backend"), "/api/ping")
        tokens = None if config.no_auth or config.token_file is None else TokenSource(Path(config.token_file))
        throttle = FailureThrottle(config.failure_delay_base, config.failure_delay_cap, config.failure_allowance,
                                   global_per_s=config.global_failures_per_s,
                                   global_burst=config.global_failure_burst)
        self.gate = Gate(tokens, throttle, config.behind_tunnel)
        self.in_flight = InFlight(config.in_flight_per_visitor)
        self.s3_credentials: CredentialSource | None = None
        self.s3: S3Gate | None = None
        if config.s3_socket is not None:
            self.s3_credentials = CredentialSource(None if config.no_auth else config.token_file,
                                                   config.s3_internal_secret_file)
            self.s3 = S3Gate(self.s3_credentials, self.gate, config.s3_max_body)
        self.session: aiohttp.ClientSession | None = None  # websockets only
        self.pools: dict[str, Pool] = {}
        self._s3_secret: tuple[str, str] | None = None
        self._readiness: dict[str, tuple[float, bool]] = {}
        self._readiness_lock = asyncio.Lock()

    def secrets(self) -> list[str]:
        """Every credential value the log must never show (asked twice per batch of log lines: one stat per file)."""
        values = self.gate.secrets()
        if self.s3_credentials is not None:
            # The token's S3 secret follows from the token just read, without a second look at its file.
            token = values[0] if values else None
            if token is not None:
                values.append(self._s3_secret_for(token))
            internal = self.s3_credentials(INTERNAL_ACCESS_KEY_ID)
            if internal:
                values.append(internal)
        return values

    def _s3_secret_for(self, token: str) -> str:
        if self._s3_secret is None or self._s3_secret[0] != token:
            self._s3_secret = (token, secret_for_token(token))
        return self._s3_secret[1]

    # -- lifecycle -------------------------------------------------------------------------------

    def _pool(self, base: URL | None = None, unix_path: str | None = None, host_header: str | None = None) -> Pool:
        config = self.config
        # Idle pooled connections are dropped before common upstream keep-alive limits (5 s) expire, so a
        # POST is never sent on a connection the upstream is closing (only bodyless requests are retried).
        return Pool(base.host if base else None, base.port if base else None, unix_path=unix_path,
                    host_header=host_header,
                    limit=config.pool_size, connect_timeout=config.connect_timeout,
                    read_timeout=config.read_timeout, idle_timeout=4.0)

    async def start(self) -> None:
        self.pools = {"metadata": self._pool(self.metadata.base), "ui": self._pool(self.ui.base)}
        if self.config.s3_socket is not None:
            self.pools["s3"] = self._pool(unix_path=str(self.config.s3_socket), host_header="objectstore")
        timeout = aiohttp.ClientTimeout(total=None, connect=None, sock_connect=self.config.connect_timeout,
                                        sock_read=self.config.read_timeout)
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.config.pool_size, limit_per_host=self.config.pool_size,
                                           ttl_dns_cache=300, keepalive_timeout=4.0),
            timeout=timeout, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(), trust_env=False,
            raise_for_status=False, skip_auto_headers=SKIP_AUTO_HEADERS)

    async def stop(self) -> None:
        for pool in self.pools.values():
            pool.close()
        if self.session is not None:
            await self.session.close()

    # -- dispatch --------------------------------------------------------------------------------

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        client = self.gate.client(request)
        if client.via_tunnel:
            request[VISITOR] = client.address
            # Tunnel visitors share cloudflared's connections: each gets its own share of requests.
            if not self.in_flight.enter(client.key):
                response = json_error(503, "too many requests in progress from this address; retry later",
                                      headers={"Retry-After": "1"})
                response.force_close()
                return response
            try:
                response = await self._route(request, client)
            finally:
                self.in_flight.leave(client.key)
        else:
            response = await self._route(request, client)
        if not response.prepared:
            response.headers["Server"] = SERVER_NAME
            if response.status >= 400 and declares_body(request):
                response.force_close()  # refused with a body, read or not: the connection ends with the refusal
        return response

    async def _route(self, request: web.BaseRequest, client: Client) -> web.StreamResponse:
        path = request.raw_path.split("?", 1)[0]
        if not path.startswith("/"):
            # absolute-form ("GET http://host/...") and "*" targets are for forward proxies
            return json_error(400, "request target must be a path")
        where = area(path, self.s3 is not None)
        problem = method_problem(request.method)
        if problem and where != "s3":
            return json_error(405, problem)
        if self.config.no_auth:
            request[ADMITTED] = True
        if self.config.no_auth and not loopback_host(request):
            return json_error(421, "without access control this stack answers only to loopback host names "
                              "(127.0.0.1, localhost, [::1]); open it by one of those")
        if where == "healthz":
            return await self.healthz()
        if where == "s3":
            assert self.s3 is not None
            response, admitted = await self.s3.handle(request, client, self.pools["s3"])
            if admitted:
                request[ADMITTED] = True
            return response
        if where == "ui" and "token" in request.query and request.method in ("GET", "HEAD"):
            return await self.token_login(request, client)
        if where == "ui" and path in PUBLIC_UI_FILES and request.method in ("GET", "HEAD"):
            # Browsers fetch the web app manifest without cookies; these files hold nothing about runs.
            return await self.static.serve(request, path)
        how = await self.authenticate(request, client)
        if isinstance(how, web.StreamResponse):
            return how
        if not how:
            return self.deny(request, where)
        request[ADMITTED] = True
        if how != "key" and (request.method not in SAFE_METHODS or is_websocket(request)) \
                and not same_origin(request, client.scheme, required=how == "cookie"):
            return json_error(403, "cross-origin request refused: a browser session's writes and websockets "
                              "must come from this stack's own pages (same scheme, host and port in Origin)")
        if where in ("api", "service"):
            return await self._to_api(request, client, where)
        if request.method == "GET" and "text/html" in request.headers.get("Accept", "") \
                and not await self._ready("ui"):
            return ui_starting_page()
        return await self.static.serve(request, path)

    async def _to_api(self, request: web.BaseRequest, client: Client, where: str) -> web.StreamResponse:
        assert self.session is not None
        problem = path_problem(request.raw_path.split("?", 1)[0], api=True) or body_problem(request)
        if problem:
            return json_error(400, problem)
        target = scrub_target(request.raw_path, self.gate.secrets())
        if target is None:
            return json_error(400, "the request path holds the access token; send it in the x-api-key header")
        if where == "api" and is_websocket(request):
            return await relay_websocket(request, self.ui, self.session,
                                         request_headers(request, client, websocket=True), target)
        refused = await send_continue(request)
        if refused is not None:
            return refused
        if where == "api":
            return await forward(request, self.ui, target, self.pools["ui"], request_headers(request, client))
        rest = target[len("/service"):]
        if not rest.startswith("/"):
            rest = "/" + rest
        return await forward(request, self.metadata, rest, self.pools["metadata"], request_headers(request, client))

    # -- access control --------------------------------------------------------------------------

    def _too_many(self, retry: float) -> web.Response:
        return json_error(429, "too many failed sign-in attempts on this stack; retry later",
                          headers={"Retry-After": str(max(1, round(retry)))})

    async def authenticate(self, request: web.BaseRequest, client: Client) -> str | web.Response | None:
        """'key', 'cookie' or 'open' for an admitted request; None (or '') to refuse; a 429 when a failure
        is refused at once. Valid credentials are admitted at once: only failures are slowed down."""
        if self.gate.tokens is None:
            return "open"
        if "x-api-key" not in request.headers and COOKIE_NAME not in request.cookies:
            return None
        how = self.gate.check(request, client)
        if how:
            return how
        request[REFUSAL] = "invalid credentials"
        retry = await self.gate.refuse(client)
        return None if retry is None else self._too_many(retry)

    def deny(self, request: web.BaseRequest, where: str) -> web.Response:
        if where == "ui" and "text/html" in request.headers.get("Accept", ""):
            return login_page()
        return json_response(401, {"error": "authentication required: missing or invalid access token",
                                   "how_to_authenticate": HOW_TO_AUTHENTICATE},
                             headers={"WWW-Authenticate": 'x-api-key realm="metaflow"'})

    async def token_login(self, request: web.BaseRequest, client: Client) -> web.Response:
        clean_query = [(k, v) for k, v in request.query.items() if k != "token"]
        path = request.raw_path.split("?", 1)[0]
        if path.startswith(("//", "/\\")):
            path = "/"  # never let a crafted path turn the redirect into one to another host
        location = path + ("?" + urlencode(clean_query) if clean_query else "")
        if self.gate.tokens is None:
            return web.Response(status=303, headers={"Location": location, "Referrer-Policy": "no-referrer"})
        cookie, valid = self.gate.token_matches(request.query.get("token", ""))
        if not valid or cookie is None:
            request[REFUSAL] = "invalid token"
            retry = await self.gate.refuse(client)
            if retry is not None:
                return self._too_many(retry)
            return login_page("That token is not valid for this stack (it may have been rotated).")
        request[ADMITTED] = True
        response = web.Response(status=303, headers={"Location": location, "Cache-Control": "no-store",
                                                     "Referrer-Policy": "no-referrer"})
        response.set_cookie(COOKIE_NAME, cookie, max_age=COOKIE_MAX_AGE, path="/", httponly=True,
                            samesite="Lax", secure=client.scheme == "https")
        return response

    # -- health ----------------------------------------------------------------------------------

    @staticmethod
    async def _answers(upstream: Upstream, pool: Pool) -> bool:
        async def ask() -> bool:
            response = await pool.request("GET", upstream.health_path, ())
            try:
                async for _ in response.chunks():
                    pass
            finally:
                response.finish()
            return response.status < 500

        try:
            return await asyncio.wait_for(ask(), 3)
        except (UpstreamError, asyncio.TimeoutError, OSError):
            return False

    async def _ready(self, part: str) -> bool:
        """Whether the metadata service, the UI backend or the object store answers (cached briefly:
        unauthenticated requests must not let anyone hammer the upstreams)."""
        async with self._readiness_lock:
            now = time.monotonic()
            known = self._readiness.get(part)
            if known is None or now - known[0] > _HEALTH_CACHE_S:
                upstream = self.s3.upstream if part == "s3" and self.s3 is not None else \
                    self.metadata if part == "metadata" else self.ui
                answers = await self._answers(upstream, self.pools[part])
                known = self._readiness[part] = (time.monotonic(), answers)
            return known[1]

    async def healthz(self) -> web.Response:
        # "ok" once flows can be tracked (metadata service and object store); the UI backend may still be
        # starting, which the answer says.
        parts = ["metadata", "ui"] + (["s3"] if self.s3 is not None else [])
        ready = dict(zip(parts, await asyncio.gather(*(self._ready(part) for part in parts))))
        ui = "ready" if ready.pop("ui") else "starting"
        if all(ready.values()):
            return json_response(200, {"status": "ok", "ui": ui})
        return json_response(503, {"status": "degraded", "ui": ui})


def build_app(config: ProxyConfig) -> Edge:
    """The proxy's request handler (raises ConfigError for an unsafe or broken configuration)."""
    validate(config)
    if config.token_file is not None and not config.no_auth:
        read_or_create_secret(Path(config.token_file))
    return Edge(config)


def _server(edge: Edge, config: ProxyConfig) -> EdgeServer:
    limits = ConnectionLimits(config.head_deadline, config.connections_per_client,
                              tunnel_peer=config.tunnel_connections if config.behind_tunnel else None)
    return EdgeServer(edge.handle, limits=limits,
                      handler_cancellation=True, keepalive_timeout=config.idle_timeout, lingering_time=0,
                      access_log_class=_AccessLogger, access_log=access_log,
                      max_line_size=config.max_line_size, max_field_size=config.max_field_size,
                      max_headers=config.max_headers)


def configure_logging(edge: Edge) -> list[BufferedHandler]:
    """The proxy's logging: every handler redacts `edge`'s secrets and writes in batches, access lines
    skip the LogRecord. Returns the buffered handlers, to flush on exit."""
    # The log format names none of these; collecting them costs a syscall and lookups on every record.
    logging.logProcesses = logging.logThreads = logging.logMultiprocessing = False
    logging.logAsyncioTasks = False  # Python 3.12+; unused before
    logging._srcfile = None  # nor the caller's file and line: no stack walk per record (logging HOWTO, "Optimization")
    redactor = Redactor(edge.secrets)
    refusals.redact = redactor.text
    buffered = buffer_root_handlers(redactor)
    install(redactor)
    _AccessLogger.direct = direct_handler(access_log)
    return buffered


async def _serve(config: ProxyConfig) -> None:
    edge = build_app(config)
    buffered = configure_logging(edge)
    await edge.start()
    runner = web.ServerRunner(_server(edge, config), handle_signals=False, shutdown_timeout=config.shutdown_timeout)
    await runner.setup()
    site = web.TCPSite(runner, config.listen_host, config.listen_port, backlog=512, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        await edge.stop()
        raise StackError(f"the proxy cannot listen on {config.listen_host}:{config.listen_port}: {exc.strerror}",
                         hint="another program holds the port; stop it or choose another port") from exc
    if config.no_auth:
        log.warning("!" * 72)
        log.warning("ACCESS CONTROL IS OFF (--no-auth): anyone who reaches %s:%s can read and WRITE all "
                    "run data. Use this only on a machine nobody else can reach.",
                    config.listen_host, config.listen_port)
        log.warning("!" * 72)
    log.info("proxy listening on http://%s:%s (metadata service %s, UI backend %s, UI files %s%s)",
             config.listen_host, config.listen_port, config.metadata_url, config.ui_backend_url, config.static_dir,
             "; trusting the tunnel's Cf-Connecting-Ip from loopback" if config.behind_tunnel else "")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        log.info("stopping")
    finally:
        await runner.cleanup()
        await edge.stop()
        for handler in buffered:
            handler.flush()


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
    parser.add_argument("--behind-tunnel", action="store_true",
                        help="a Cloudflare tunnel connects from loopback: take the client address from its "
                             "Cf-Connecting-Ip header (and the scheme from X-Forwarded-Proto)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: returns the exit status."""
    args = _parser().parse_args(argv)
    config = ProxyConfig(listen_host=args.listen_host, listen_port=args.listen_port,
                         metadata_url=args.metadata_url, ui_backend_url=args.ui_backend_url,
                         static_dir=args.static_dir, token_file=args.token_file,
                         no_auth=args.no_auth, behind_tunnel=args.behind_tunnel, s3_socket=args.s3_socket,
                         s3_internal_secret_file=args.s3_internal_secret_file)
    return procs.service_main(lambda: serve(config), quiet=["aiohttp"])


if __name__ == "__main__":
    sys.exit(main())
