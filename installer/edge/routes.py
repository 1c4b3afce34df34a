"""Which part of the stack a request is for, and the request shapes refused before any route sees them.

    /healthz     {"status": "ok", "ui": "ready" | "starting"} once flows can be tracked, else 503
                 {"status": "degraded", ...}; no credentials, nothing else revealed
    /service/... metadata service, "/service" stripped (writes included: the Metaflow client posts here)
    /api/...     UI backend, prefix kept (it runs with PATH_PREFIX=/api); /api/ws websockets relayed
    /s3/...      the object store, "/s3" stripped; AWS SigV4 instead of the token
    /...         the UI bundle; client-side routes fall back to index.html. Its manifest, icon and
                 robots.txt are served without credentials: browsers fetch the manifest without
                 cookies, and none of them says anything about the runs

Refused everywhere: request targets that are not a path (absolute-form, `*`),
TRACE/TRACK/CONNECT (TRACE would echo credentials back to a script). Refused on
the API and S3 routes: `.` and `..` segments, also percent-encoded, and NUL bytes,
because upstreams resolve them differently than the checks here saw them; on the
API routes also encoded `/` and `\\`. A body on a method that carries none is
refused, not dropped: the upstream would otherwise see a different request than
the one whose credentials were checked.

Credentials never travel upstream in a target: token-like query parameters
(`token`, `api_key`, `x-api-key`, ...) and any parameter holding a current secret
are removed before a request is relayed (the upstreams log their targets in
clear), and a path holding a secret is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import unquote, unquote_plus

from aiohttp import web

from .config import S3_PREFIX

__all__ = ["PUBLIC_UI_FILES", "TOKEN_PARAMS", "area", "body_problem", "method_problem", "path_problem",
           "scrub_target"]

PUBLIC_UI_FILES = frozenset({"/manifest.json", "/favicon.ico", "/robots.txt"})
REFUSED_METHODS = frozenset({"TRACE", "TRACK", "CONNECT"})
BODYLESS = frozenset({"GET", "HEAD", "OPTIONS"})
S3_BODYLESS = BODYLESS | {"DELETE"}  # no S3 operation reads a body on these
TOKEN_PARAMS = frozenset({"token", "access_token", "auth_token", "api_key", "apikey", "api-key", "x-api-key",
                          "x_api_key", "mf_stack_session"})


def area(path: str, s3: bool) -> str:
    """'healthz', 's3', 'api', 'service' or 'ui'."""
    if path == "/healthz":
        return "healthz"
    prefixes = (("s3", S3_PREFIX),) if s3 else ()
    for name, prefix in (*prefixes, ("api", "/api"), ("service", "/service")):
        if path == prefix or path.startswith(prefix + "/"):
            return name
    return "ui"


def method_problem(method: str) -> str | None:
    if method.upper() in REFUSED_METHODS:
        return f"{method} is not allowed here"
    return None


def path_problem(raw_path: str, *, api: bool) -> str | None:
    """Why a raw path may not be relayed upstream, or None."""
    lowered = raw_path.lower()
    if "%00" in lowered or "\x00" in raw_path:
        return "the path holds a NUL byte"
    if api and ("%2f" in lowered or "%5c" in lowered or "\\" in raw_path):
        return "the path holds an encoded '/' or a '\\'"
    decoded = unquote(raw_path, errors="replace")
    if any(part in (".", "..") for part in raw_path.split("/")) \
            or any(part in (".", "..") for part in decoded.split("/")):
        return "the path holds '.' or '..' segments"
    return None


def declares_body(request: web.BaseRequest) -> bool:
    return "Transfer-Encoding" in request.headers or (request.content_length or 0) > 0


def body_problem(request: web.BaseRequest, bodyless: frozenset[str] = BODYLESS) -> str | None:
    if request.method in bodyless and declares_body(request):
        return f"a {request.method} request may not carry a body"
    return None


def _decodings(text: str) -> tuple[str, ...]:
    once = unquote_plus(text, errors="replace")
    return text, once, unquote_plus(once, errors="replace")


def scrub_target(raw_target: str, secrets: Sequence[str]) -> str | None:
    """`raw_target` without token-like query parameters or parameters holding one of `secrets` (the rest
    kept byte for byte); None when the path itself holds a secret."""
    path, sep, query = raw_target.partition("?")
    if any(secret in form for form in _decodings(path) for secret in secrets):
        return None
    if not sep:
        return raw_target
    kept = []
    for item in query.split("&"):
        name = item.partition("=")[0]
        if unquote_plus(name, errors="replace").strip().lower() in TOKEN_PARAMS:
            continue
        if any(secret in form for form in _decodings(item) for secret in secrets):
            continue
        kept.append(item)
    return path + ("?" + "&".join(kept) if kept else "")
