"""A registry in front of the real local one that behaves like public registries do.

It proxies manifests and blobs to the local registry of scripts/build_images.sh, and adds
what Docker Hub and its mirrors do: bearer tokens from a token service (with a Basic login
for named users), HTTP 429 with Docker Hub's body and RateLimit headers once anonymous
clients made N manifest GETs (HEAD requests are not counted, as on Docker Hub), a set of
tags it holds (others: 404 MANIFEST_UNKNOWN), repositories under other names, and a link of
limited speed shared by all connections.
"""

from __future__ import annotations

import base64
import http.server
import json
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import requests

HUB_429 = {"errors": [{"code": "TOOMANYREQUESTS", "message": "You have reached your unauthenticated pull rate "
                       "limit. https://www.docker.com/increase-rate-limit"}]}
WINDOW = 21600


@dataclass
class Behaviour:
    upstream: str = "http://127.0.0.1:5000"
    anonymous_pulls: int | None = None  # manifest GETs before 429; None: no limit
    users: dict[str, str] = field(default_factory=dict)  # user -> password; a login lifts the limit
    login_required: bool = False
    tags: set[str] | None = None  # "repo:tag" served; None: all
    paths: dict[str, str] = field(default_factory=dict)  # served repo -> upstream repo
    retag: dict[str, str] = field(default_factory=dict)  # served tag -> upstream tag
    rate: float | None = None  # bytes per second for blobs, shared by all connections
    per_connection: bool = False  # the rate holds for each connection (a CDN's per-stream cap), not for all


class _Link:
    """A shared token bucket: every connection's bytes draw on one rate."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.lock = threading.Lock()
        self.next_free = time.monotonic()

    def take(self, count: int) -> None:
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next_free)
            self.next_free = start + count / self.rate
            wait = self.next_free - now
        if wait > 0:
            time.sleep(wait)


class Front(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, behaviour: Behaviour) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.behaviour = behaviour
        self.link = _Link(behaviour.rate) if behaviour.rate else None
        self.tokens: dict[str, str | None] = {}  # token -> user (None: anonymous)
        self.manifest_gets = 0
        self.requests: list[tuple[str, str]] = []  # (method, path)
        self.authorizations: list[str] = []  # every Authorization header seen, for the tests to search
        self.lock = threading.Lock()

    def handle_error(self, request: object, client_address: object) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):  # a client that left
            super().handle_error(request, client_address)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: Front
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        self._handle("HEAD")

    def do_GET(self) -> None:
        self._handle("GET")

    def _json(self, status: int, data: object, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _handle(self, method: str) -> None:
        front = self.server
        path = self.path.split("?", 1)[0]
        with front.lock:
            front.requests.append((method, path))
            if self.headers.get("Authorization"):
                front.authorizations.append(self.headers["Authorization"])
        if path == "/token":
            return self._token()
        user = self._bearer_user()
        if user is False:
            challenge = (f'Bearer realm="{front.url}/token",service="front",'
                         f'scope="repository:{_repo_of(path)}:pull"' if path != "/v2/" else
                         f'Bearer realm="{front.url}/token",service="front"')
            return self._json(401, {"errors": [{"code": "UNAUTHORIZED"}]}, {"WWW-Authenticate": challenge})
        if path == "/v2/":
            return self._json(200, {})
        if "/manifests/" in path:
            return self._manifest(method, path, user)
        if "/blobs/" in path:
            return self._blob(method, path)
        return self._json(404, {"errors": [{"code": "NOT_FOUND"}]})

    def _token(self) -> None:
        front, rules = self.server, self.server.behaviour
        user = None
        header = self.headers.get("Authorization", "")
        if header.startswith("Basic "):
            name, _, password = base64.b64decode(header[6:]).decode().partition(":")
            if rules.users.get(name) != password:
                return self._json(401, {"details": "incorrect username or password"})
            user = name
        elif rules.login_required:
            return self._json(401, {"details": "login required"})
        token = secrets.token_hex(16)
        front.tokens[token] = user
        self._json(200, {"token": token, "expires_in": 300})

    def _bearer_user(self) -> str | None | bool:
        header = self.headers.get("Authorization", "")
        if not header.startswith("Bearer "):
            return False
        token = header[7:]
        return self.server.tokens.get(token, False)

    def _manifest(self, method: str, path: str, user: str | None) -> None:
        front, rules = self.server, self.server.behaviour
        repo, reference = path[len("/v2/"):].split("/manifests/", 1)
        limits = {}
        if rules.anonymous_pulls is not None and user is None:
            with front.lock:
                if method == "GET":
                    front.manifest_gets += 1
                used = front.manifest_gets
            left = max(0, rules.anonymous_pulls - used)
            limits = {"ratelimit-limit": f"{rules.anonymous_pulls};w={WINDOW}",
                      "ratelimit-remaining": f"{left};w={WINDOW}"}
            if method == "GET" and used > rules.anonymous_pulls:
                return self._json(429, HUB_429, limits)
        if not reference.startswith("sha256:") and rules.tags is not None and f"{repo}:{reference}" not in rules.tags:
            return self._json(404, {"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown"}]})
        upstream = rules.paths.get(repo, repo)
        reference = rules.retag.get(reference, reference)
        answer = requests.request(method, f"{rules.upstream}/v2/{upstream}/manifests/{reference}",
                                  headers={"Accept": self.headers.get("Accept", "")}, timeout=10)
        self.send_response(answer.status_code)
        for key in ("Content-Type", "Docker-Content-Digest", "Content-Length"):
            if key in answer.headers:
                self.send_header(key, answer.headers[key])
        for key, value in limits.items():
            self.send_header(key, value)
        self.end_headers()
        if method == "GET":
            self.wfile.write(answer.content)

    def _blob(self, method: str, path: str) -> None:
        rules = self.server.behaviour
        repo, digest = path[len("/v2/"):].split("/blobs/", 1)
        upstream = rules.paths.get(repo, repo)
        with requests.request(method, f"{rules.upstream}/v2/{upstream}/blobs/{digest}", stream=True,
                              timeout=30) as answer:
            self.send_response(answer.status_code)
            self.send_header("Content-Length", answer.headers.get("Content-Length", "0"))
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            if method == "HEAD":
                return
            link = _Link(rules.rate) if rules.rate and rules.per_connection else self.server.link
            for chunk in answer.iter_content(64 * 1024):
                if link:
                    link.take(len(chunk))
                self.wfile.write(chunk)


def _repo_of(path: str) -> str:
    rest = path[len("/v2/"):]
    for marker in ("/manifests/", "/blobs/", "/tags/"):
        if marker in rest:
            return rest.split(marker, 1)[0]
    return rest


@contextmanager
def running(behaviour: Behaviour) -> Iterator[Front]:
    front = Front(behaviour)
    thread = threading.Thread(target=front.serve_forever, daemon=True)
    thread.start()
    try:
        yield front
    finally:
        front.shutdown()
        front.server_close()
        thread.join(timeout=5)
