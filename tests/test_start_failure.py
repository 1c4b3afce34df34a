"""A service that fails at start is reported within seconds, by name, with its log; nothing is left running."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import installer
from installer import procs, state
from installer.errors import ServiceFailed
from installer.settings import resolve
from installer.stack import Event

from .helpers_firstrun import assert_nothing_runs, saved_settings

WITHIN_S = 5.0


class StartRecorder:
    """Follows one service through an `up`: when it died (its process gone, or a bind error in its log)
    and when `up` said it failed."""

    def __init__(self, flags: dict, service: str, on_spawn=lambda pid: None) -> None:
        self.settings = resolve(flags)
        self.service = service
        self.on_spawn = on_spawn
        self.failed_at: float | None = None
        self.died_at: float | None = None
        self.events: list[Event] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True)

    def __enter__(self) -> StartRecorder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def progress(self, event: Event) -> None:
        self.events.append(event)
        if event.step == self.service and event.message.startswith("failed:") and self.failed_at is None:
            self.failed_at = time.monotonic()

    def _follow(self) -> None:
        log = self.settings.log_path(self.service)
        offset = log.stat().st_size if log.exists() else 0
        pid = None
        while not self._done.is_set() and self.died_at is None:
            data = state.recorded(self.settings, self.service)
            if pid is None and data is not None:
                pid = data["pid"]
                self.on_spawn(pid)
            gone = pid is not None and procs.proc_info(pid) is None  # exited (a zombie counts as gone)
            if gone or re.search(r"address already in use", _read_from(log, offset), re.IGNORECASE):
                self.died_at = time.monotonic()
            time.sleep(0.05)

    def seconds_to_failure(self) -> float:
        assert self.died_at is not None, f"the {self.service} never died: {self.events}"
        assert self.failed_at is not None, f"`up` never said the {self.service} failed: {self.events}"
        return self.failed_at - self.died_at


def _read_from(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            return handle.read().decode("utf-8", "replace")
    except OSError:
        return ""


_LISTENER = ("import socket, sys, time\n"
             "s = socket.socket()\n"
             "s.bind(('127.0.0.1', int(sys.argv[1])))\n"
             "s.listen()\n"
             "time.sleep(600)\n")


@pytest.mark.parametrize("service, port_setting, flag", [
    ("metadata", "metadata_port", "--metadata-port (MF_METADATA_PORT)"),
    # Not awaited by `up` (the UI comes up on its own): watched while the services beside it start.
    ("ui-backend", "ui_port", "--ui-port (MF_UI_METADATA_PORT)"),
])
def test_a_port_taken_after_the_checks_is_reported_at_once(stack: dict, service: str, port_setting: str,
                                                           flag: str) -> None:
    port = int(stack[port_setting])
    holder: list[subprocess.Popen] = []
    taken_at: list[float] = []

    def take_port(pid: int) -> None:
        # `up` found the port free and started the service; another program takes the port first.
        holder.append(subprocess.Popen([sys.executable, "-c", _LISTENER, str(port)]))
        deadline = time.monotonic() + 10
        while procs.listener_of(port) is None and time.monotonic() < deadline:
            time.sleep(0.02)
        taken_at.append(time.monotonic())

    with StartRecorder(stack, service, on_spawn=take_port) as recorder:
        try:
            with pytest.raises(ServiceFailed) as caught:
                installer.up(progress=recorder.progress, **stack)
            raised_at = time.monotonic()
            assert holder and holder[0].poll() is None, "the port holder did not start"
            message = str(caught.value)
            title = resolve(stack).log_path(service)
            assert f"could not listen on port {port}: it is taken by pid {holder[0].pid}" in message, message
            assert str(title) in message
            assert flag in message
            assert "nothing of this stack is running" in message
            # From the moment the start was doomed (the port taken), before the service even tried it.
            assert recorder.failed_at is not None, recorder.events
            assert recorder.failed_at - taken_at[0] < WITHIN_S, recorder.events
            # The entry point, waiting beside it for a metadata service that will never answer, stopped
            # waiting at once: the error came long before the start timeout (90 s), rollback included.
            assert raised_at - taken_at[0] < 30, recorder.events
            assert_nothing_runs(stack)
            assert saved_settings(stack) is None
        finally:
            for process in holder:
                process.kill()
                process.wait()
    print(f"failure reported {recorder.failed_at - taken_at[0]:.2f} s after the port was taken, raised after "
          f"{raised_at - taken_at[0]:.2f} s:\n{message}")
    assert installer.up(**stack).running  # the port free again: the same settings start


def test_a_service_that_exits_at_start_is_named_with_its_log(stack: dict) -> None:
    # An address this machine does not have: the entry point cannot listen there and exits.
    flags = {**stack, "bind": "203.0.113.7"}
    with StartRecorder(flags, "proxy") as recorder:
        with pytest.raises(ServiceFailed) as caught:
            installer.up(progress=recorder.progress, **flags)
        raised_at = time.monotonic()
    message = str(caught.value)
    assert "the entry point (reverse proxy) exited during start-up" in message, message
    log = resolve(flags).log_path("proxy")
    assert caught.value.log == log and f"last lines of {log}" in message
    assert "cannot assign requested address" in message  # the end of its log says why
    assert "nothing of this stack is running" in message
    assert recorder.seconds_to_failure() < WITHIN_S, recorder.events
    assert_nothing_runs(flags)
    print(f"failure reported {recorder.seconds_to_failure():.2f} s after the process exited, raised after "
          f"{raised_at - recorder.died_at:.2f} s")
