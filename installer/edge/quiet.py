"""Log lines about requests nobody vouched for, at a bounded rate and length.

Anyone who can reach the entry point can make it refuse requests as fast as the
network allows, and the log lives in MF_ROOT/logs (on Colab: Google Drive). So
every line caused by a request without valid credentials (its access line, a
malformed request, a refused connection, a head that never ended) passes a
token bucket, 2 lines a second with a burst of 60, and is cut to 240
characters. Lines over the rate are counted, not written; the next line that
passes says how many were left out. Whatever an unauthenticated client sends,
the proxy log grows by at most about 500 bytes a second.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

__all__ = ["MAX_LINE", "QuietLog", "clip"]

MAX_LINE = 240


def clip(text: str, limit: int = MAX_LINE) -> str:
    """`text` on one line, at most `limit` characters (control characters shown as '?')."""
    flat = "".join(ch if ch.isprintable() else "?" for ch in text)
    return flat if len(flat) <= limit else flat[:limit - 3] + "..."


class QuietLog:
    """A token bucket in front of a logger: `line()` writes or counts one line."""

    def __init__(self, per_s: float = 2.0, burst: int = 60,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.per_s, self.burst = per_s, burst
        self._clock = clock
        self._tokens, self._at = float(burst), clock()
        self.left_out = 0
        # Credentials are removed before a line is cut: a cut could leave a secret's prefix unrecognised.
        self.redact: Callable[[str], str] = lambda text: text

    def allow(self) -> bool:
        """True when one more line may be written now (and take its token); False counts it as left out."""
        now = self._clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.per_s)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        self.left_out += 1
        return False

    def text(self, message: str) -> str:
        """`message` clipped, with the count of lines left out since the last one written."""
        suffix = f" [{self.left_out} similar lines not logged]" if self.left_out else ""
        self.left_out = 0
        return clip(self.redact(message), MAX_LINE - len(suffix)) + suffix

    def line(self, logger: logging.Logger, level: int, message: str) -> None:
        if self.allow():
            logger.log(level, "%s", self.text(message))


# One bucket for the whole proxy process: the rate bounds the sum of every kind of refusal line.
refusals = QuietLog()
