"""Whether a service answers, and whether one that does not yet is still within its start-up time."""

from __future__ import annotations

import time
from pathlib import Path

import psycopg
import requests

from . import objectstore
from .services import Health, Service
from .settings import Settings


def healthy(check: Health, timeout: float = 3.0) -> bool:
    if check.kind == "process":
        return True  # asked only about a process known to be alive
    if check.kind == "unix-http":
        return objectstore.store_answers(Path(check.target), timeout=timeout)
    try:
        if check.kind == "postgres":
            if check.ready_file is not None and postmaster_status(check.ready_file) != "ready":
                return False
            with psycopg.connect(check.target, connect_timeout=max(1, int(timeout))) as conn:
                conn.execute("SELECT 1")
            return True
        answer = requests.get(check.target, timeout=timeout)
        return answer.ok and check.expect in answer.text
    except (psycopg.Error, requests.RequestException):
        return False


def within_start_up(settings: Settings, service: Service, data: dict | None) -> bool:
    """A service `up` does not wait for, started (as `data`, its record, says) less than its start-up time ago."""
    return (not service.awaited and data is not None
            and time.time() - data.get("started", 0) < settings.start_timeout)


def postmaster_status(pid_file: Path) -> str | None:
    """The state PostgreSQL keeps on line 8 of postmaster.pid: starting, ready, stopping, standby."""
    try:
        lines = pid_file.read_text().splitlines()
    except OSError:
        return None
    return lines[7].strip() if len(lines) > 7 else None
