"""Progress of a long transfer, as a progress line that also carries its numbers.

A `Transfer` is a `str` (so every progress consumer can show it as a line, and a log
keeps it as text) with the numbers a progress bar needs: the CLI redraws one line on a
terminal, the notebook panel moves a bar.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from . import humanize


class Transfer(str):
    what: str  # pulling, unpacking
    done: int
    total: int
    rate: float  # bytes per second, over the last few seconds
    left: float | None  # seconds, None while the rate is unknown
    finished: bool

    def __new__(cls, what: str, done: int, total: int, rate: float, left: float | None,
                finished: bool = False) -> Transfer:
        percent = 100 * done / total if total else 100.0
        text = f"{what} {humanize.size(done)} of {humanize.size(total)} ({percent:.0f}%)"
        if finished:
            text += " done"
        elif rate > 0:
            text += f", {humanize.size(rate)}/s"
            if left is not None:
                text += f", {humanize.duration(left)} left"
        line = super().__new__(cls, text)
        line.what = what
        line.done, line.total, line.rate, line.left, line.finished = done, total, rate, left, finished
        return line

    @property
    def fraction(self) -> float:
        return min(1.0, self.done / self.total) if self.total else 1.0


SETTLE_SECONDS = 2.0


class Meter:
    """Counts bytes from several threads and reports a Transfer at most every `every` seconds."""

    def __init__(self, what: str, total: int, report: Callable[[Transfer], None], every: float = 0.5,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.what, self.total, self.report, self.every, self.clock = what, total, report, every, clock
        self.done = 0
        self._lock = threading.Lock()
        self._began = self._last = clock()
        self._samples: list[tuple[float, int]] = [(self._began, 0)]

    def add(self, count: int) -> None:
        with self._lock:
            self.done += count
            now = self.clock()
            if now - self._last < self.every:
                return
            self._last = now
            line = self._line(now)
        self.report(line)

    def finish(self) -> Transfer:
        """The end of a transfer that completed (a byte count that was an estimate becomes the total)."""
        with self._lock:
            self.done = max(self.done, self.total)
            now = self.clock()
            elapsed = max(now - self._began, 1e-6)
            line = Transfer(self.what, self.done, self.total, self.done / elapsed, 0.0, finished=True)
        self.report(line)
        return line

    def _line(self, now: float) -> Transfer:
        self._samples.append((now, self.done))
        # The rate over the last ~5 s: a link that slows down shows it soon.
        while len(self._samples) > 2 and now - self._samples[1][0] > 5.0:
            self._samples.pop(0)
        (then, before) = self._samples[0]
        rate = (self.done - before) / (now - then) if now > then else 0.0
        # A rate over the first moments is noise ("27 h left" for a 15 s unpack): no estimate yet.
        settled = now - self._began >= SETTLE_SECONDS
        left = (self.total - self.done) / rate if rate > 0 and settled else None
        return Transfer(self.what, self.done, self.total, rate, left)
