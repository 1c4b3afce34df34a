"""What `status` reports: each service's state and health, the schema version, the URLs, the last snapshot."""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field

import psycopg

from . import procs, runtime, schema, snapshot, state
from .connection import read_connection_file
from .health import healthy, within_start_up
from .services import Service, dsn, service_container, snapshot_status_file
from .settings import Settings


@dataclass
class ServiceStatus:
    name: str
    title: str
    state: str  # running, stopped, dead
    pid: int | None
    port: int
    healthy: bool
    uptime: float | None
    log: str
    # Alive, not answering yet, and still within its start-up time (the UI backend after `up` returned).
    starting: bool = False


@dataclass
class StackStatus:
    root: str
    services: list[ServiceStatus]
    schema_version: int | None
    urls: dict[str, str]
    already_running: bool = False
    steps: list[dict] = field(default_factory=list)
    # Last snapshot: generation, age_seconds, size_bytes, error (None when snapshots are off).
    snapshot: dict | None = None
    # Set by `up` when it restored the database from a snapshot: which generation, from where.
    restored: str | None = None
    connection_string: str | None = None
    # The Metaflow client inside the service image: the UI backend reads runs' data with it.
    image_metaflow_version: str | None = None

    @property
    def running(self) -> bool:
        """Every service runs and answers, or is still starting on its own."""
        return bool(self.services) and all(s.state == "running" and (s.healthy or s.starting)
                                           for s in self.services)

    @property
    def ui_ready(self) -> bool:
        return any(s.name == "ui-backend" and s.healthy for s in self.services)

    def to_dict(self) -> dict:
        return {**asdict(self), "running": self.running, "ui_ready": self.ui_ready}


def collect(settings: Settings, services: list[Service], db_password: str, udocker: runtime.Udocker) -> StackStatus:
    """Each service's state and health as recorded under MF_ROOT/state, and what the stack serves."""
    rows = []
    for service in services:
        data = state.recorded(settings, service.name)
        pid = state.alive(data)
        if pid is not None:
            condition = "running"
        elif data is not None and data.get("boot_id") == procs.boot_id():
            condition = "dead"  # started on this machine and gone without `down`: its log says why
        else:
            condition = "stopped"
        is_healthy = pid is not None and healthy(service.health, timeout=2.0)
        uptime = time.time() - data["started"] if pid is not None and data else None
        starting = not is_healthy and pid is not None and within_start_up(settings, service, data)
        rows.append(ServiceStatus(service.name, service.title, condition, pid, service.port, is_healthy,
                                  None if uptime is None else round(uptime, 1),
                                  str(settings.log_path(service.name)), starting))
    version = None
    if rows and rows[0].healthy:
        with contextlib.suppress(psycopg.Error):
            with psycopg.connect(dsn(settings, db_password)) as conn:
                version = schema.current_version(conn)
    base = f"http://127.0.0.1:{settings.port}"
    urls = {"ui": f"{base}/", "metadata_service": f"{base}/service", "ui_backend": f"{base}/api"}
    saved = read_connection_file(settings.root)
    if saved and saved.get("tunnel"):
        urls["public"] = saved["url"]
    return StackStatus(str(settings.root), rows, version, urls, snapshot=_snapshot_summary(settings),
                       connection_string=saved.get("connection_string") if saved else None,
                       image_metaflow_version=_image_metaflow_version(settings, udocker))


def _image_metaflow_version(settings: Settings, udocker: runtime.Udocker) -> str | None:
    root = udocker.container_root(service_container(settings))
    found = sorted(root.glob("opt/latest/lib/python3*/site-packages/metaflow-*.dist-info"))
    return found[-1].name[len("metaflow-"):-len(".dist-info")] if found else None


def _snapshot_summary(settings: Settings) -> dict | None:
    """The last snapshot, as the watcher (or `down`, or `snapshot`) recorded it."""
    if settings.no_snapshots:
        return None
    recorded = snapshot.read_status(snapshot_status_file(settings))
    summary = {"folder": str(settings.snapshot_dir), "generation": None, "age_seconds": None,
               "size_bytes": None, "error": None, "state": "not started"}
    if recorded is not None:
        summary.update(generation=recorded.last_id, size_bytes=recorded.last_size, error=recorded.last_error,
                       state=recorded.state,
                       age_seconds=None if recorded.age_s is None else round(recorded.age_s, 1))
    return summary
