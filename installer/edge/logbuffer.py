"""The proxy's log handler: records buffered briefly and written in batches, redacted as a batch.

A handler that writes and flushes every record costs a write syscall per request
(the access log has a line per request) and a redaction pass per line. This one
collects formatted records and writes them together:
- at most `delay` seconds after the first record of a batch (a timer on the
  running event loop; outside the loop's thread, at once);
- at once for a record of level WARNING or above, and when a batch grows past
  `max_bytes`;
- on flush() and close(): the proxy flushes on SIGTERM/SIGINT before it exits, and
  logging's exit hook flushes every handler on any other exit, so no line is lost
  by stopping the process (only a SIGKILL loses the last `delay` seconds).

Every batch goes through the Redactor (redact.py) before it is written: the same
text, the same patterns and the same secrets as a record-by-record filter, with
two lookups of the current secrets per batch (when it starts and when it is
written). The Redactor keeps secrets it saw before, so a line queued before a
token rotation and written after it is still redacted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TextIO

from .redact import Redactor

__all__ = ["BufferedHandler", "buffer_root_handlers", "direct_handler"]

_PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # procs.service_main's


class BufferedHandler(logging.Handler):
    redacts_batches = True  # install() (redact.py) hands this handler its redactor instead of a filter

    def __init__(self, stream: TextIO, redactor: Redactor, *, delay: float = 0.1, max_bytes: int = 64 * 1024) -> None:
        super().__init__()
        self.stream = stream
        self.redactor = redactor
        self.delay = delay
        self.max_bytes = max_bytes
        self._lines: list[str] = []
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None
        self._second = -1
        self._stamp = ""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:  # noqa: BLE001 - as logging.Handler does: report and go on
            self.handleError(record)
            return
        self.add(text, urgent=record.levelno >= logging.WARNING)

    def line(self, name: str, levelno: int, message: str) -> None:
        """Queue a record given as its parts, formatted as format() would, without building a LogRecord:
        the access log's path, a line per request."""
        formatter = self.formatter
        if formatter is None or formatter._fmt != _PLAIN_FORMAT or formatter.datefmt is not None \
                or self.filters or levelno < self.level:
            self.handle(logging.LogRecord(name, levelno, "", 0, message, None, None))
            return
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second, self._stamp = second, formatter.formatTime(
                logging.makeLogRecord({"created": second}), None)[:-4]  # the date and time, without ",msec"
        self.add(f"{self._stamp},{int((now - second) * 1000):03d} {logging.getLevelName(levelno)} {name}: {message}",
                 urgent=levelno >= logging.WARNING)

    def add(self, text: str, *, urgent: bool = False) -> None:
        """Queue one formatted line (redacted when its batch is written)."""
        with self.lock:  # type: ignore[union-attr]
            if not self._lines:
                # The secrets as they are when a batch starts, and again when it is written: a token
                # rotated in between is redacted from both sides of the rotation.
                self.redactor.observe()
            self._lines.append(text)
            self._size += len(text)
            if urgent or self._size >= self.max_bytes:
                self._write()
            elif self._timer is None:
                self._schedule()

    def _schedule(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None:
            self._write()  # no loop in this thread to flush later: write now
            return
        self._timer = loop.call_later(self.delay, self.flush)

    def _write(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._lines:
            return
        batch = "\n".join(self._lines) + "\n"
        self._lines.clear()
        self._size = 0
        try:
            self.stream.write(self.redactor.text(batch))
            self.stream.flush()
        except Exception:  # noqa: BLE001 - a full disk must not take the proxy down
            pass

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._write()

    def close(self) -> None:
        self.flush()
        super().close()


def buffer_root_handlers(redactor: Redactor, *, delay: float = 0.1) -> list[BufferedHandler]:
    """Replace the root logger's plain stream handlers by buffered ones on the same streams."""
    root = logging.getLogger()
    made = []
    for handler in list(root.handlers):
        if type(handler) is not logging.StreamHandler:
            continue
        buffered = BufferedHandler(handler.stream, redactor, delay=delay)
        buffered.setLevel(handler.level)
        buffered.setFormatter(handler.formatter)
        for kept in handler.filters:
            if kept is not redactor:
                buffered.addFilter(kept)
        root.removeHandler(handler)
        root.addHandler(buffered)
        made.append(buffered)
    return made


def direct_handler(logger: logging.Logger) -> BufferedHandler | None:
    """The one handler every record of `logger` ends up in, when that is a BufferedHandler and nothing on
    the way (filters, other handlers) would see the record: then lines may go to it directly."""
    found: list[logging.Handler] = []
    current: logging.Logger | None = logger
    while current is not None:
        if current.filters:
            return None
        found.extend(current.handlers)
        current = current.parent if current.propagate else None  # type: ignore[assignment]
    if len(found) == 1 and isinstance(found[0], BufferedHandler):
        return found[0]
    return None
