"""The watcher's status file: what `status` shows about snapshots."""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ..errors import SnapshotError


@dataclass
class SnapshotStatus:
    """What the watcher last wrote to its status file."""
    state: str = "starting"          # starting | watching | snapshotting | failing | waiting-db | stopped
    pid: int | None = None
    updated_at: float = 0.0
    last_id: str | None = None
    last_at: float | None = None     # when the last snapshot was published (unix time)
    last_size: int | None = None
    last_uploaded: int | None = None
    last_duration_s: float | None = None
    last_error: str | None = None    # the error of the last attempt, None once a snapshot succeeds again
    last_error_at: float | None = None
    last_wal_at: float | None = None  # when WAL was last shipped (unix time)
    wal_pieces: int = 0              # WAL pieces shipped by this watcher
    wakeups: int = 0                 # inotify wake-ups
    checks: int = 0                  # database change checks
    snapshots: int = 0
    failures: int = 0

    @property
    def age_s(self) -> float | None:
        return None if self.last_at is None else max(0.0, time.time() - self.last_at)


def write_status(path: Path | str, status: SnapshotStatus) -> None:
    """Replace the status file atomically (readers never see half of it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    status.updated_at = time.time()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(asdict(status), handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_status(path: Path | str) -> SnapshotStatus | None:
    """The watcher's last status, or None if it has not written one yet."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise SnapshotError(f"cannot read snapshot status {path}: {exc}",
                            hint="the watcher rewrites it on its next step") from exc
    known = {item.name for item in fields(SnapshotStatus)}
    return SnapshotStatus(**{key: value for key, value in data.items() if key in known})
