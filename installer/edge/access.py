"""Who may use the entry point: the token, the session cookie, Host and Origin rules, the failure throttle.

Credentials:
- The token lives in a 0600 file, re-read whenever the file changes, so rotating
  it needs no restart. Losing the file denies everyone (fail closed).
- API clients send it as header `x-api-key` (what METAFLOW_SERVICE_AUTH_KEY sends);
  it is removed before the request goes upstream.
- Browsers open `/?token=...` once and get a cookie holding an HMAC of the token,
  never the token, so rotating the token logs every browser out. HttpOnly, Secure
  behind https, SameSite=Lax: Strict would drop the cookie on the redirect that
  follows a link opened from a notebook (another site). Lax still withholds it
  from cross-site subrequests, posts and websockets; on top, cookie sessions must
  send an Origin (or, lacking one, a Referer) naming this stack's scheme, host and
  port on writes and websockets, because sibling tunnel hosts (*.trycloudflare.com)
  may count as the same site; a cookie write naming neither is refused.

No-auth mode (loopback only): a web page in a browser on this machine can still
reach 127.0.0.1, by DNS rebinding (a name of the attacker's resolving to
127.0.0.1) or by a cross-site form post. So only loopback Host values are
accepted, and writes and websockets carrying a foreign Origin are refused (API
clients such as Metaflow's send none).

Who the client is (for the failure throttle): the TCP peer, except behind the
tunnel. cloudflared (`tunnel --url http://127.0.0.1:PORT`) connects from
loopback, so every tunnelled request has the same peer; Cloudflare's edge sets
`Cf-Connecting-Ip` to the real client and overwrites any value the client sent.
The proxy trusts that header only when it was started with --behind-tunnel (the
stack does so when the tunnel is on) AND the peer is loopback; X-Forwarded-For and
X-Forwarded-Host are never trusted. The alternatives were weighed: a tunnel-only
unix socket would be stronger, but cloudflared starts a quick tunnel only for
`--url` (a unix-socket origin is for named tunnels); a second loopback port is no
stronger than this rule (local programs reach both). What the rule leaves open: a
local program (or a rebinding web page) can forge Cf-Connecting-Ip while the
tunnel is on and so choose its throttle identity. That only spreads its own
failures over made-up identities, which is why there is also a global cap.

Failures: credentials are checked first, in constant time, and a valid one is
admitted at once, whatever other clients are doing: no stranger can lock the
token holders out. Only a failure is slowed down. A client (an IPv4 address, an
IPv6 /64, or behind the tunnel the visitor's address) that failed recently gets
its refusal after a delay growing with its recent failures (bounded, decaying, an
asyncio.sleep: the loop keeps serving); at most MAX_WAITING failures wait at
once, and beyond that a failure is refused at once with 429. All clients
together may fail only `global_failures_per_s` times per second (with a burst);
beyond that a failure is answered 429 at once (S3: 503 SlowDown), without its
delay. This bounds the work and the log lines failures cost; it does not stop
guessing, and need not: the token carries 256 random bits.

Behind the tunnel, every visitor shares cloudflared's loopback connections, so
the per-address connection cap (protocol.py) is larger for that peer and each
visitor may have at most `in_flight_per_visitor` requests in progress.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import web

from ..errors import StackError
from ..secrets import read_secret
from .config import is_loopback

__all__ = ["API_KEY_HEADER", "COOKIE_NAME", "MAX_WAITING", "Client", "FailureThrottle", "Gate", "InFlight",
           "TokenSource", "cookie_value", "loopback_host", "same_origin"]

log = logging.getLogger("installer.proxy")

COOKIE_NAME = "mf_stack_session"
API_KEY_HEADER = "x-api-key"
TUNNEL_CLIENT_HEADER = "Cf-Connecting-Ip"
COOKIE_MAX_AGE = 30 * 24 * 3600
_COOKIE_CONTEXT = b"metaflow-stack proxy session v1"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
REFUSAL = "mfstack.refusal"   # request key: why its credentials were refused (for its access line)
MAX_WAITING = 128  # failures sleeping out their penalty at once; more are refused at once


def cookie_value(token: str) -> str:
    """The session cookie a browser holds for `token`: an HMAC, so the token itself never sits in a cookie."""
    return hmac.new(token.encode(), _COOKIE_CONTEXT, hashlib.sha256).hexdigest()


class TokenSource:
    """The current token, re-read when the token file changes (stat per check; a read only on change)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._stat_path = str(self.path)  # stat() on a str skips the os.fspath() of a Path, every request
        self._stamp: tuple[int, int, int] | None = None
        self._token: str | None = None
        self._cookie: str | None = None
        self._complained = False

    def current(self) -> tuple[str | None, str | None]:
        """(token, expected cookie value); (None, None) when there is no usable token: deny all."""
        try:
            info = os.stat(self._stat_path)
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
    """Per-client delay before checking credentials (a leaky bucket) and a global budget of failures."""

    def __init__(self, base: float, cap: float, allowance: int, *, global_per_s: float = 10.0,
                 global_burst: int = 100, leak_per_s: float = 1.0, max_clients: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.base, self.cap, self.allowance = base, cap, allowance
        self.leak_per_s = leak_per_s
        self.max_clients = max_clients
        self.global_per_s, self.global_burst = global_per_s, global_burst
        self._clock = clock
        self._scores: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._spent, self._spent_at = 0.0, clock()

    def _score(self, client: str, now: float) -> float:
        score, seen = self._scores.get(client, (0.0, now))
        return max(0.0, score - (now - seen) * self.leak_per_s)

    def delay(self, client: str) -> float:
        """How long `client` waits before its next credential is checked."""
        excess = self._score(client, self._clock()) - self.allowance
        if excess <= 0:
            return 0.0
        return min(self.cap, self.base * (2.0 ** (excess - 1)))

    def _global_level(self, now: float) -> float:
        return max(0.0, self._spent - (now - self._spent_at) * self.global_per_s)

    def retry_after(self) -> float | None:
        """None while the global budget allows another check; else seconds until it does."""
        level = self._global_level(self._clock())
        if level + 1.0 <= self.global_burst:
            return None
        return (level + 1.0 - self.global_burst) / self.global_per_s

    def fail(self, client: str) -> None:
        """Count one failed credential, against the client and against the global budget."""
        now = self._clock()
        # Capped where the delay reached its cap long ago: the score decays back within a minute or so.
        self._scores[client] = (min(self._score(client, now) + 1.0, self.allowance + 32.0), now)
        self._scores.move_to_end(client)
        while len(self._scores) > self.max_clients:
            self._scores.popitem(last=False)
        # Over budget, failures are refused without counting: the level never climbs past the burst.
        self._spent, self._spent_at = min(float(self.global_burst), self._global_level(now) + 1.0), now


@dataclass(frozen=True)
class Client:
    """Who sent a request, as far as the proxy can tell."""
    address: str          # X-Forwarded-For upstream
    scheme: str           # "https" behind the tunnel
    via_tunnel: bool

    @cached_property
    def key(self) -> str:
        """The throttle's key: the address, or its /64 for IPv6 (one subscriber holds a whole /64)."""
        try:
            ip = ipaddress.ip_address(self.address)
        except ValueError:
            return self.address
        if isinstance(ip, ipaddress.IPv6Address):
            if ip.ipv4_mapped is not None:
                return str(ip.ipv4_mapped)
            return str(ipaddress.ip_network(f"{ip}/64", strict=False))
        return str(ip)


class InFlight:
    """Requests in progress per tunnel visitor (they all share cloudflared's loopback connections)."""

    def __init__(self, per_client: int) -> None:
        self.per_client = per_client
        self._count: dict[str, int] = {}

    def enter(self, key: str) -> bool:
        count = self._count.get(key, 0)
        if count >= self.per_client:
            return False
        self._count[key] = count + 1
        return True

    def leave(self, key: str) -> None:
        count = self._count.get(key, 0) - 1
        if count > 0:
            self._count[key] = count
        else:
            self._count.pop(key, None)


def _valid_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def identify(request: web.BaseRequest, behind_tunnel: bool) -> Client:
    peer = request.remote or "?"
    if behind_tunnel and is_loopback(peer):
        forwarded = request.headers.get(TUNNEL_CLIENT_HEADER, "").strip()
        if forwarded and _valid_ip(forwarded):
            proto = request.headers.get("X-Forwarded-Proto", "").split(",", 1)[0].strip().lower()
            return Client(forwarded, proto if proto in ("http", "https") else request.scheme, True)
    return Client(peer, request.scheme, False)


def _split_host(host: str) -> str:
    """The host name of a Host header value, without port or brackets (lower case)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else ""
    name, sep, port = host.rpartition(":")
    return name if sep and port.isdigit() else host


def loopback_host(request: web.BaseRequest) -> bool:
    """True when the Host header names this machine's loopback (what no rebinding name can be)."""
    values = request.headers.getall("Host", [])
    return len(values) == 1 and is_loopback(_split_host(values[0]))


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _origin_of(url: str, default_scheme: str | None = None) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an origin or URL, the port filled in from the scheme; None if unusable."""
    try:
        parts = urlsplit(url if default_scheme is None else f"{default_scheme}://{url}")
        scheme, host, port = parts.scheme.lower(), (parts.hostname or "").lower(), parts.port
    except ValueError:
        return None
    if scheme not in _DEFAULT_PORTS or not host:
        return None
    return scheme, host, port if port is not None else _DEFAULT_PORTS[scheme]


def same_origin(request: web.BaseRequest, scheme: str, *, required: bool) -> bool:
    """True when the request's Origin (or, lacking one, its Referer) names the scheme, host and port it
    was sent to; a request with neither passes only when not `required` (cookie writes require one)."""
    origins = request.headers.getall("Origin", [])
    if not origins:
        origins = request.headers.getall("Referer", [])
    if not origins:
        return not required
    hosts = request.headers.getall("Host", [])
    if len(origins) > 1 or len(hosts) != 1:
        return False
    given = _origin_of(origins[0].strip())
    expected = _origin_of(hosts[0].strip(), scheme)
    return given is not None and given == expected


def is_websocket(request: web.BaseRequest) -> bool:
    return (request.headers.get("Upgrade", "").lower() == "websocket"
            and "upgrade" in request.headers.get("Connection", "").lower())


class Gate:
    """Decides, per request, whether its credentials admit it."""

    def __init__(self, tokens: TokenSource | None, throttle: FailureThrottle, behind_tunnel: bool) -> None:
        self.tokens = tokens
        self.throttle = throttle
        self.behind_tunnel = behind_tunnel
        self.waiting = 0   # failures sleeping out their penalty now

    def client(self, request: web.BaseRequest) -> Client:
        return identify(request, self.behind_tunnel)

    async def refuse(self, client: Client) -> float | None:
        """Count one failed credential and slow its refusal down: None once the penalty is served, or the
        seconds to retry after when the refusal is immediate (over the global budget, or too many waiting)."""
        retry = self.throttle.retry_after()
        delay = self.throttle.delay(client.key)
        self.throttle.fail(client.key)
        if retry is not None:
            return retry
        if delay <= 0:
            return None
        if self.waiting >= MAX_WAITING:
            return max(1.0, delay)
        self.waiting += 1
        try:
            await asyncio.sleep(delay)
        finally:
            self.waiting -= 1
        return None

    @staticmethod
    def _equal(given: str, expected: str | None) -> bool:
        return expected is not None and hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode())

    def check(self, request: web.BaseRequest, client: Client) -> str | None:
        """'key' or 'cookie' for valid credentials, 'open' without access control, '' for credentials
        that failed (the caller counts the failure: refuse()), None when none were offered."""
        if self.tokens is None:
            return "open"
        token, expected_cookie = self.tokens.current()
        given = request.headers.get(API_KEY_HEADER)
        if given is not None:
            if self._equal(given, token):
                return "key"
        else:
            cookie = request.cookies.get(COOKIE_NAME)
            if cookie is None:
                return None  # nothing was tried: no penalty for a first visit
            if self._equal(cookie, expected_cookie):
                return "cookie"
        return ""

    def token_matches(self, given: str) -> tuple[str | None, bool]:
        """(cookie value to set, valid?) for a `?token=` login (the caller counts a failure: refuse())."""
        token, expected_cookie = self.tokens.current() if self.tokens is not None else (None, None)
        if self._equal(given, token) and expected_cookie is not None:
            return expected_cookie, True
        return None, False

    def secrets(self) -> list[str]:
        """The values the log redactor must never let through."""
        if self.tokens is None:
            return []
        token, cookie = self.tokens.current()
        return [value for value in (token, cookie) if value]
