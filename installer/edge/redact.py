"""One filter that keeps credentials out of every log record and every error page.

Installed on the root logger's handlers of the proxy and of the object store, so it
sees every record of every library (aiohttp's parser errors, http.server's error
lines, tracebacks) after formatting and before anything reaches the log file.

Two layers, because neither alone suffices:
- the current secrets themselves (the token, its cookie value, the S3 secrets),
  literally and percent-encoded, wherever they appear;
- anything that looks like a credential even when it is not the current one (a
  wrong guess may be a mistyped real token, an old one, or someone else's): values
  of token-like query parameters (after `?`, `&`, `;` or their percent-encodings),
  and values of credential headers quoted from raw request bytes.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterable
from urllib.parse import quote

__all__ = ["REDACTED", "Redactor", "install"]

REDACTED = "REDACTED"
_MIN_SECRET = 8  # shorter strings would blank out ordinary words
_KEPT_FORMER = 16

_PARAM_NAMES = ("token", "access_token", "api_key", "apikey", "x-api-key", "key", "password", "secret",
                "x-amz-signature", "x-amz-security-token", "signature", "mf_stack_session")
_PARAM = re.compile(
    r"(?i)(?:(?<=%26)|(?<=%3f)|(?<=%3b)|(?<=%20)|(?<![A-Za-z0-9_%]))"
    r"(" + "|".join(re.escape(n) for n in _PARAM_NAMES) + r")(=|%3d)"
    r"((?:(?!%26|%3b|%20|%22|%27)[^&;\s\"'\\<>#,])+)")
_HEADER = re.compile(
    r"(?i)\b(x-api-key|authorization|cookie|set-cookie|x-amz-security-token|proxy-authorization)"
    r"(\s*:\s*)(.+?)(?=\\r|\\n|\r|\n|'|\"|$)", re.MULTILINE)


class Redactor(logging.Filter):
    """Rewrites each record's message (and traceback) with credentials replaced by REDACTED."""

    def __init__(self, secrets: Callable[[], Iterable[str]] = tuple) -> None:
        super().__init__()
        self._secrets = secrets
        self._busy = threading.local()
        # The encoded forms of the last secrets seen: recomputed only when the secrets change.
        self._forms: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())
        # Secrets seen before and replaced since (a rotated token) stay redacted: a buffered line may
        # be written after the rotation, and an old token is still someone's credential.
        self._former: tuple[str, ...] = ()

    def _current(self) -> tuple[str, ...]:
        # A secrets provider may itself log (a token file that went missing): never recurse into it.
        if getattr(self._busy, "on", False):
            return ()
        self._busy.on = True
        try:
            values = tuple(s for s in self._secrets() if s and len(s) >= _MIN_SECRET)
        except Exception:  # noqa: BLE001 - redaction must never break logging
            values = ()
        finally:
            self._busy.on = False
        cached = self._forms
        if cached[0] == values:
            return cached[1]
        self._former = tuple(dict.fromkeys(v for v in (*cached[0], *self._former) if v not in values))[:_KEPT_FORMER]
        forms = set()
        for value in (*values, *self._former):
            forms.update({value, quote(value, safe=""), quote(quote(value, safe=""), safe="")})
        ordered = tuple(sorted(forms, key=len, reverse=True))
        self._forms = (values, ordered)
        return ordered

    def observe(self) -> None:
        """Look at the current secrets now (a secret replaced later stays redacted: see _former)."""
        self._current()

    def text(self, text: str) -> str:
        """`text` with every credential in it replaced."""
        for secret in self._current():
            if secret in text:
                text = text.replace(secret, REDACTED)
        # Each pattern needs a character the test before it looks for: most records (access log lines
        # without a query) hold neither, and a substring test is far cheaper than a scan.
        if "=" in text or "%3d" in text or "%3D" in text:
            text = _PARAM.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)
        if ":" in text:
            text = _HEADER.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken format string still gets logged, redacted
            message = str(record.msg)
        record.msg, record.args = self.text(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.text(record.exc_text)
        if record.stack_info:
            record.stack_info = self.text(record.stack_info)
        return True


def install(redactor: Redactor) -> None:
    """Put `redactor` on every handler of the root logger (where every record ends up)."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig()
    for handler in root.handlers:
        if getattr(handler, "redacts_batches", False):
            handler.redactor = redactor  # type: ignore[attr-defined]
        elif redactor not in handler.filters:
            handler.addFilter(redactor)
