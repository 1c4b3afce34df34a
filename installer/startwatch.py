"""Watching a service while it starts: dead, or unable to listen on its port, is known at once.

Waiting for a service's health check alone would report such a start only when the start-up
time runs out (minutes): a service that cannot bind its port may log the error and hang on, and
a container service runs below udocker and proot, which outlive a guest that failed. So while
`up` waits, each poll also asks: is the process still alive, and is its port held by a process
outside its own tree (taken after `up` checked it was free)?
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_all
from dataclasses import dataclass, field
from pathlib import Path

from . import procs
from .errors import ServiceFailed, StackError
from .services import Progress, Service

# What a failed bind says in the logs of the stack's services (Python's OSError, aiohttp, PostgreSQL).
_BIND_ERROR = re.compile(r"address already in use|errno 98\b", re.IGNORECASE)
_PORT_CHECK_EVERY_S = 1.0  # a check reads every process's open files: not on every poll
_OUTPUT_BYTES = 64 * 1024


class StartAborted(Exception):
    """Another service starting beside this one failed: stop waiting, `up` reports that one."""


@dataclass
class StartWatch:
    service: Service
    pid: int
    log_path: Path
    log_offset: int  # where this start's output begins in its log
    port_hint: Callable[[], str]  # how to free the port or choose another
    _port_checked: float = field(default=0.0, init=False)

    def problem(self, force_port_check: bool = False) -> ServiceFailed | None:
        """Why this start has failed, or None while it may still succeed."""
        if not procs.alive(self.pid):
            procs.wait_gone([self.pid], 0)
            if self.service.port and _BIND_ERROR.search(self._output()):
                return self._port_taken(procs.listener_of(self.service.port))
            return ServiceFailed(f"the {self.service.title} exited during start-up", log=self.log_path,
                                 log_tail=procs.tail(self.log_path),
                                 hint=f"read {self.log_path}; `python -m installer logs {self.service.name}` "
                                      "shows it too")
        now = time.monotonic()
        if self.service.port and (force_port_check or now >= self._port_checked + _PORT_CHECK_EVERY_S):
            self._port_checked = now
            holder = self._foreign_listener()
            if holder is not None:
                return self._port_taken(holder)
        return None

    def _foreign_listener(self) -> tuple[int, str] | None:
        holder = procs.listener_of(self.service.port)
        if holder is None:
            return None
        pid = holder[0]
        if pid and (pid == self.pid or pid in {p.pid for p in procs.descendants(self.pid)}):
            return None  # its own socket: it is up, or nearly
        return holder

    def _port_taken(self, holder: tuple[int, str] | None) -> ServiceFailed:
        port = self.service.port
        if holder is None:
            taken = "it was taken by another process, gone since"
        elif holder[0]:
            taken = f"it is taken by pid {holder[0]} ({' '.join(holder[1].split())[:120]})"
        else:
            taken = f"it is taken by {holder[1]}"
        return ServiceFailed(f"the {self.service.title} could not listen on port {port}: {taken}",
                             log=self.log_path, log_tail=procs.tail(self.log_path),
                             hint=f"{self.port_hint()}; its log: {self.log_path}")

    def _output(self) -> str:
        """What the service wrote since it was started (the end of it)."""
        try:
            with open(self.log_path, "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                start = self.log_offset if self.log_offset <= size else 0  # rotated meanwhile
                handle.seek(max(start, size - _OUTPUT_BYTES))
                return handle.read().decode("utf-8", "replace")
        except OSError:
            return ""


@dataclass
class Wave:
    """Services started side by side: the first failure ends every wait of its wave."""

    failed: threading.Event = field(default_factory=threading.Event)
    # The awaited services are all healthy: one that is not awaited need not be watched any longer.
    settled: threading.Event = field(default_factory=threading.Event)

    def check(self) -> None:
        if self.failed.is_set():
            raise StartAborted()


Step = Callable[[str, Callable[[Progress], "str | None"]], None]


def start_wave(group: list[Service], step: Step, start: Callable[[Service, Progress, Wave], str | None]) -> None:
    """Start the services of one wave side by side, each as a `step` of `up`.

    The first that fails ends the others' waits at once, and that failure is the one raised.
    """
    wave = Wave()

    def start_one(service: Service, progress: Progress) -> str | None:
        try:
            return start(service, progress, wave)
        except StackError as exc:
            wave.failed.set()
            with contextlib.suppress(Exception):  # said now: the error itself comes after the rollback
                progress(f"failed: {exc.message}")
            raise
        except BaseException:
            wave.failed.set()
            raise

    with ThreadPoolExecutor(max_workers=len(group)) as pool:
        futures = [pool.submit(step, s.name, lambda p, s=s: start_one(s, p)) for s in group]
        wait_all([f for s, f in zip(group, futures) if s.awaited])
        wave.settled.set()
        wait_all(futures)
    errors = [f.exception() for f in futures]
    real = [e for e in errors if e is not None and not isinstance(e, StartAborted)]
    failure = real[0] if real else next((e for e in errors if e is not None), None)
    if failure is not None:
        raise failure
