"""What `up` recorded about each service it started: its pid, and when and on which boot it started.

One small JSON file per service under the stack's state folder. A record names a live service only
while that very process runs: same boot, same pid, same start time (a recycled pid is not ours).
Light to import, so that the monitor can check the stack every few seconds without loading the rest.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from . import procs
from .settings import Settings


def state_file(settings: Settings, name: str) -> Path:
    return settings.state_dir / f"{name}.json"


def recorded(settings: Settings, name: str) -> dict | None:
    try:
        data = json.loads(state_file(settings, name).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def record(settings: Settings, name: str, pid: int) -> None:
    info = procs.proc_info(pid)
    data = {"pid": pid, "started": time.time(), "start_ticks": info.start_ticks if info else None,
            "boot_id": procs.boot_id()}
    tmp = state_file(settings, name).with_suffix(".tmp")
    with procs.open_private(tmp) as handle:
        handle.write(json.dumps(data))
    tmp.replace(state_file(settings, name))


def forget(settings: Settings, name: str) -> None:
    state_file(settings, name).unlink(missing_ok=True)


def live_pid(settings: Settings, name: str) -> int | None:
    """The recorded pid if that very process still runs (not a recycled pid)."""
    return alive(recorded(settings, name))


def alive(data: dict | None) -> int | None:
    """The pid of a record (as `recorded` read it) if that very process still runs."""
    if not data or "pid" not in data:
        return None
    if data.get("boot_id") != procs.boot_id():
        return None  # recorded on another machine, or before a reboot: MF_ROOT may live on Drive
    info = procs.proc_info(int(data["pid"]))
    if info is None or (data.get("start_ticks") is not None and info.start_ticks != data["start_ticks"]):
        return None
    return info.pid


def dead(settings: Settings, skip: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """Services recorded on this boot whose process is gone (not stopped by `down`: it forgets them)."""
    gone = []
    for path in sorted(settings.state_dir.glob("*.json")):
        data = recorded(settings, path.stem)
        if (path.stem not in skip and data and "pid" in data and data.get("boot_id") == procs.boot_id()
                and alive(data) is None):
            gone.append(path.stem)
    return gone
