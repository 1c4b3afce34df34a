"""Everything the command line prints goes through here.

Verbs return data; these functions turn it into lines for a person (colour only
on a terminal) or into JSON for a program.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from . import humanize
from .errors import StackError
from .stack import Event, StackStatus
from .transfer import Transfer


# Without a terminal, a transfer's progress is one plain line this often (and its end).
PLAIN_TRANSFER_EVERY = 5.0


class Printer:
    def __init__(self, stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream or sys.stdout
        self.colour = self.stream.isatty()
        self.clock = clock
        self._redrawn = False  # a progress line is on screen without its newline
        self._last_plain = -PLAIN_TRANSFER_EVERY

    def _paint(self, text: str, code: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.colour else text

    def line(self, text: str = "") -> None:
        if self._redrawn:
            self._redrawn = False
            print(file=self.stream)
        print(text, file=self.stream, flush=True)

    def _end_redrawn(self) -> None:
        if self._redrawn:
            self._redrawn = False
            print(file=self.stream, flush=True)

    def transfer(self, name: str, transfer: Transfer) -> None:
        """One line redrawn in place on a terminal; a plain line every few seconds otherwise."""
        if self.colour:
            width = max(20, shutil.get_terminal_size((100, 20)).columns - 1)
            filled = int(20 * transfer.fraction)
            bar = "#" * filled + "-" * (20 - filled)
            text = f"  {name} [{bar}] {transfer}"[:width]
            self.stream.write(f"\r{text}\033[K")
            self.stream.flush()
            self._redrawn = True
            if transfer.finished:
                self._end_redrawn()
            return
        now = self.clock()
        if transfer.finished or now - self._last_plain >= PLAIN_TRANSFER_EVERY:
            self._last_plain = now
            self.line(f"  {name} {transfer}")

    def event(self, event: Event) -> None:
        name = f"{event.step:<11}"
        if isinstance(event.message, Transfer) and event.seconds is None:
            self.transfer(name, event.message)
            return
        if event.seconds is None:
            if event.message != "starting":
                self.line(f"  {name} {self._paint(event.message, '2')}")
            return
        self.line(f"{self._paint('ok', '32')} {name} {event.message} {self._paint(f'({event.seconds:.1f} s)', '2')}")

    def status(self, status: StackStatus) -> None:
        if status.already_running:
            self.line("The stack is already running.")
        self.line(f"stack at {status.root}")
        for row in status.services:
            health = self._paint("healthy", "32") if row.healthy else self._paint("unhealthy", "31")
            if row.starting:
                health = self._paint("starting", "33")
            if row.state != "running":
                health = self._paint(row.state, "33" if row.state == "stopped" else "31")
            uptime = f"up {humanize.duration(row.uptime)}" if row.uptime is not None else ""
            pid = f"pid {row.pid}" if row.pid else ""
            port = f"port {row.port}" if row.port else ""
            self.line(f"  {row.name:<11} {health:<9} {port:<10} {pid:<10} {uptime}")
        if status.schema_version is not None:
            self.line(f"  schema version {status.schema_version}")
        if status.image_metaflow_version:
            self.line(f"  service image carries metaflow {status.image_metaflow_version} (the UI backend reads runs with it)")
        if status.restored:
            self.line(self._paint(status.restored, "1"))
        if status.snapshot is not None:
            self.line(f"  snapshots: {_snapshot_line(status.snapshot)}")
        else:
            self.line(self._paint("  snapshots: OFF (local-only mode: the database dies with this machine)", "33"))
        if status.running:
            self.line("")
            ui_note = "" if status.ui_ready else self._paint(
                "  (starting: ready in a few seconds; the page reloads until then; flows are tracked already)", "33")
            self.line(f"UI:               {status.urls['ui']}{ui_note}")
            self.line(f"metadata service: {status.urls['metadata_service']}")

    def restore(self, report: Any) -> None:
        self.line(f"restored snapshot {report.generation} into {report.pgdata}: {report.files} files, "
                  f"{report.size / 1e6:.1f} MB, {report.duration_s:.1f} s")
        for generation, why in report.skipped:
            self.line(self._paint(f"  skipped {generation}: {why}", "33"))
        if report.replaced:
            self.line(f"  the previous data folder was moved to {report.replaced}")

    def json(self, data: Any) -> None:
        self.line(json.dumps(data, indent=2, default=str))

    def warning(self, text: str) -> None:
        self._end_redrawn()
        print(self._paint("WARNING: ", "1;33") + text, file=sys.stderr, flush=True)

    def error(self, error: StackError) -> None:
        self._end_redrawn()
        print(self._paint("error: ", "31") + str(error), file=sys.stderr, flush=True)


def _snapshot_line(info: dict) -> str:
    if info["generation"] is None:
        line = f"none yet ({info['folder']})"
    else:
        size = "" if info["size_bytes"] is None else f", {humanize.size(info['size_bytes'])}"
        line = f"last {info['generation']}, {humanize.age(info['age_seconds'] or 0)}{size} ({info['folder']})"
    if info["error"]:
        line += f"\n    last attempt FAILED: {info['error']}"
    return line
