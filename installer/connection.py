"""The connection string: one copyable line that reaches the stack and proves access.

It is the browser login address itself, ``https://<host>/?token=<token>``: opened
in a browser it logs in to the UI; pasted into `connect` it configures a remote
notebook. `up` and the tunnel manager also keep it in ``<MF_ROOT>/connection.json``
so that a notebook sharing the same Drive folder can find it without pasting.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, parse_qs, quote, urlencode, urlsplit, urlunsplit

from .errors import ConnectError

CONNECTION_FILE = "connection.json"

_QUOTES = "\"'`“”‘’<>"


class BadConnectionString(ConnectError):
    """The text given to `connect` is not a usable stack address."""

    reason = "bad_url"


def format_connection(url: str, token: str) -> str:
    """The one line a person copies: the stack's base URL with the token as `?token=`."""
    base = normalise_base_url(url)
    if not token or not token.strip():
        raise BadConnectionString("the connection string needs an access token",
                                  hint="pass the token the stack printed on `up`")
    return f"{base}/?{urlencode({'token': token.strip()}, quote_via=quote)}"


def normalise_base_url(url: str) -> str:
    """`scheme://host[:port][/prefix]` without a trailing slash, query or fragment."""
    parts = _split(url)
    path = parts.path.rstrip("/")
    return urlunsplit((parts.scheme.lower(), parts.netloc, path, "", ""))


def parse_connection(text: str) -> tuple[str, str]:
    """(base_url, token) from a pasted connection string.

    Accepts surrounding whitespace or quotes (copied from a notebook cell or a
    terminal), and a trailing slash or fragment.
    """
    if text is None or not str(text).strip():
        raise BadConnectionString("the connection string is empty",
                                  hint="paste the line `up` printed, like https://<host>/?token=<token>")
    cleaned = str(text).strip().strip(_QUOTES).strip()
    if any(ch.isspace() for ch in cleaned):
        raise BadConnectionString(f"the connection string contains spaces or line breaks: {cleaned!r}",
                                  hint="copy the whole line again, as one line")
    parts = _split(cleaned)
    tokens = parse_qs(parts.query).get("token", [])
    token = tokens[0].strip() if tokens else ""
    if not token:
        raise BadConnectionString(f"the connection string has no access token: {_redact(cleaned)}",
                                  hint="it ends with ?token=<token>; copy the full line `up` printed")
    return normalise_base_url(cleaned), token


def _split(url: str) -> SplitResult:
    if not isinstance(url, str) or not url.strip():
        raise BadConnectionString("no URL given", hint="use an address like https://<host>")
    url = url.strip()
    if "://" not in url:
        raise BadConnectionString(f"not a URL (no http:// or https://): {_redact(url)}",
                                  hint="the address starts with https:// (tunnel) or http:// (same machine)")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise BadConnectionString(f"not a valid URL: {_redact(url)} ({exc})",
                                  hint="copy the address again") from exc
    if parts.scheme.lower() not in ("http", "https"):
        raise BadConnectionString(f"unsupported URL scheme {parts.scheme!r}: {_redact(url)}",
                                  hint="the address starts with https:// (tunnel) or http:// (same machine)")
    if not parts.hostname:
        raise BadConnectionString(f"the URL names no host: {_redact(url)}",
                                  hint="use an address like https://<words>.trycloudflare.com")
    if port == 0:
        raise BadConnectionString(f"the URL has port 0: {_redact(url)}")
    return parts


def _redact(text: str) -> str:
    """Hide a token value in messages that may be shown or logged."""
    head, sep, rest = text.partition("token=")
    if not sep:
        return text
    value, amp, tail = rest.partition("&")
    shown = value[:4] + "..." if len(value) > 4 else "..."
    return f"{head}token={shown}{amp}{tail}"


def write_connection_file(root: Path, url: str, token: str,
                          extra: Mapping[str, Any] | None = None) -> Path:
    """Write `<root>/connection.json` (0600, replaced atomically) and return its path.

    Fields: url, token, connection_string, service_url, updated_at, tunnel, plus `extra`.
    """
    base = normalise_base_url(url)
    record: dict[str, Any] = {
        "url": base,
        "token": token,
        "connection_string": format_connection(base, token),
        "service_url": f"{base}/service",
        "updated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tunnel": False,
    }
    record.update(extra or {})
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    target = root / CONNECTION_FILE
    write_private_json(target, record)
    return target


def read_connection_file(root: Path) -> dict[str, Any] | None:
    """The record in `<root>/connection.json`, or None if there is none."""
    path = Path(root) / CONNECTION_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConnectError(f"cannot read {path}: {exc}", hint="check the folder is mounted and readable") from exc
    if not text.strip():  # its name reached Google Drive, its content did not: `up` writes it again
        return None
    try:
        record = json.loads(text)
    except ValueError as exc:
        raise ConnectError(f"{path} is not valid JSON", hint="run `python -m installer up` again to rewrite it") from exc
    if not isinstance(record, dict) or not record.get("connection_string"):
        raise ConnectError(f"{path} holds no connection string",
                           hint="run `python -m installer up` again to rewrite it")
    return record


def write_private_json(target: Path, data: Mapping[str, Any]) -> None:
    """Write JSON readable only by the owner; readers never see a half-written file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)  # created 0600
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2, sort_keys=True)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
