"""Bringing the stack up and down, and reporting on it.

`up` returns once every service is healthy (it must: a notebook cell waits on
it), so what is running is recorded on disk, one small JSON file a service
under MF_ROOT/state, and `down`, `status` and `logs` work from any process.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psycopg
import requests

from . import humanize, objectstore, procs, runtime, schema, snapshot, tunnel
from .connection import read_connection_file, write_connection_file
from .errors import ConfigError, PortInUse, ServiceFailed, SnapshotError, StackBusy, StackError
from .secrets import read_or_create_secret
from .services import (DB_NAME, Health, Hooks, Progress, Secrets, Service, StopPolicy, define, dsn,
                       migrations_dir, service_container, snapshot_status_file, waves)
from .settings import Settings
from .settings import save as save_settings

# Free space wanted before pulling: the three unpacked images measured 2.6 GB.
PULL_SPACE_BYTES = 3 * 1024**3
STOP_TIMEOUT = 30.0


@dataclass(frozen=True)
class Event:
    """One line of progress: a step starting (seconds None) or finished (seconds set)."""

    step: str
    message: str
    seconds: float | None = None


Reporter = Callable[[Event], None]


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
        return bool(self.services) and all(s.state == "running" and s.healthy for s in self.services)

    def to_dict(self) -> dict:
        return {**asdict(self), "running": self.running}


# --- context -------------------------------------------------------------------


@dataclass
class _Stack:
    settings: Settings
    udocker: runtime.Udocker
    secrets: Secrets
    services: list[Service]


def _secrets(settings: Settings) -> Secrets:
    s3_internal = settings.secrets_dir / "s3-internal"
    return Secrets(db_password=read_or_create_secret(settings.secrets_dir / "db_password"),
                   token_file=settings.token_file,
                   s3_internal_file=s3_internal, s3_internal=read_or_create_secret(s3_internal))


def _load(settings: Settings, progress: Progress = lambda _: None) -> _Stack:
    udocker = runtime.prepare(settings.udocker_dir, settings.cache_dir / "bin", progress)
    secrets = _secrets(settings)

    def prepare_database(step_progress: Progress) -> str:
        _ensure_database(settings, secrets.db_password)
        marker = snapshot.sequences_marker(settings.pgdata_dir)
        if marker.exists():  # restored: ids the lost window handed out must not come again
            snapshot.advance_sequences(dsn(settings, secrets.db_password, dbname="postgres"))
            marker.unlink()
        report = schema.apply(dsn(settings, secrets.db_password), migrations_dir(settings, udocker), step_progress)
        applied = f"applied {len(report.applied)} migration(s)" if report.applied else "up to date"
        return f"schema version {report.version} ({applied})"

    def final_snapshot(step_progress: Progress) -> str | None:
        if settings.no_snapshots:
            return None
        admin_dsn = dsn(settings, secrets.db_password, dbname="postgres")
        if snapshot.unchanged_since_last(admin_dsn, settings.snapshot_dir):
            return "final snapshot not needed: nothing changed since the last one"
        step_progress("taking the final snapshot")
        generation = snapshot.take_snapshot(admin_dsn, settings.pgdata_dir, settings.snapshot_dir,
                                            settings.snapshot_keep)
        _record_snapshot(settings, generation)
        return f"final snapshot {generation.id} ({humanize.size(generation.size)})"

    hooks = Hooks(prepare_database=prepare_database, final_snapshot=final_snapshot)
    return _Stack(settings, udocker, secrets, define(settings, udocker, secrets, hooks))


def _ensure_database(settings: Settings, password: str) -> None:
    with psycopg.connect(dsn(settings, password, dbname="postgres"), autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DB_NAME,)).fetchone() is None:
            conn.execute(f'CREATE DATABASE "{DB_NAME}"')


_LOCK_WAIT_S = 10.0


@contextlib.contextmanager
def _lock(settings: Settings, verb: str) -> Iterator[None]:
    # On local disk, not in MF_ROOT: on Google Drive a lock is neither shared nor needed by the next runtime.
    settings.cache_dir.mkdir(parents=True, exist_ok=True)
    path = settings.cache_dir / "stack.lock"
    with open(path, "a+") as handle:
        # A short wait: the monitor holds the lock for each of its checks, which take longer when
        # MF_ROOT is on Google Drive (a round trip per state file).
        deadline = time.monotonic() + _LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.1)
                    continue
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                raise StackBusy(f"another command is already working on this stack ({holder})",
                                hint="wait for it to finish, then try again") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"`{verb}`, pid {os.getpid()}")
        handle.flush()
        try:
            yield
        finally:
            handle.truncate(0)
            fcntl.flock(handle, fcntl.LOCK_UN)


# --- recorded state ------------------------------------------------------------


def _state_file(settings: Settings, name: str) -> Path:
    return settings.state_dir / f"{name}.json"


def _recorded(settings: Settings, name: str) -> dict | None:
    try:
        return json.loads(_state_file(settings, name).read_text())
    except (OSError, ValueError):
        return None


def _record(settings: Settings, service: Service, pid: int) -> None:
    info = procs.proc_info(pid)
    data = {"pid": pid, "started": time.time(), "start_ticks": info.start_ticks if info else None,
            "boot_id": procs.boot_id()}
    tmp = _state_file(settings, service.name).with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(_state_file(settings, service.name))


def _live_pid(settings: Settings, name: str) -> int | None:
    """The recorded pid if that very process still runs (not a recycled pid)."""
    data = _recorded(settings, name)
    if not data:
        return None
    if data.get("boot_id") != procs.boot_id():
        return None  # recorded on another machine, or before a reboot: MF_ROOT may live on Drive
    info = procs.proc_info(int(data["pid"]))
    if info is None or (data.get("start_ticks") is not None and info.start_ticks != data["start_ticks"]):
        return None
    return info.pid


def healthy(check: Health, timeout: float = 3.0) -> bool:
    if check.kind == "process":
        return True  # asked only about a process known to be alive
    if check.kind == "unix-http":
        return objectstore.store_answers(Path(check.target), timeout=timeout)
    try:
        if check.kind == "postgres":
            with psycopg.connect(check.target, connect_timeout=max(1, int(timeout))) as conn:
                conn.execute("SELECT 1")
            return True
        answer = requests.get(check.target, timeout=timeout)
        return answer.ok and check.expect in answer.text
    except (psycopg.Error, requests.RequestException):
        return False


# --- up ------------------------------------------------------------------------


def up(settings: Settings, report: Reporter = lambda _: None) -> StackStatus:
    """Start whatever is not running, in order, each confirmed healthy before the next."""
    _check_root(settings)
    with _lock(settings, "up"):
        save_settings(settings)
        steps: list[dict] = []

        def step(name: str, action: Callable[[Progress], str | None]) -> None:
            report(Event(name, "starting"))
            began = time.monotonic()
            detail = action(lambda line: report(Event(name, line)))
            seconds = time.monotonic() - began
            steps.append({"step": name, "seconds": round(seconds, 2), "detail": detail or ""})
            report(Event(name, detail or "done", seconds))

        holder: dict[str, _Stack] = {}
        step("runtime", lambda p: _prepare_runtime(settings, holder, p))
        stack = holder["stack"]
        if _all_running(settings, stack):
            status = _status(settings, stack)
            status.already_running = True
            return status
        step("images", lambda p: _pull_images(stack, p))
        restored = None
        if not settings.no_snapshots:
            step("snapshot-dir", lambda p: _check_snapshot_dir(settings))
            if _is_empty(settings.pgdata_dir):
                holder["restored"] = None
                step("restore", lambda p: _restore_if_any(settings, holder, p))
                restored = holder["restored"]
        for wave in waves(stack.services):
            # Services of one wave need only what already runs: start them side by side.
            with ThreadPoolExecutor(max_workers=len(wave)) as pool:
                started = [pool.submit(step, s.name, lambda p, s=s: _start(stack, s, p)) for s in wave]
                for future in started:
                    future.result()
        if settings.tunnel:
            step("tunnel", lambda p: _start_tunnel(settings))
        else:
            write_connection_file(settings.root, f"http://127.0.0.1:{settings.port}", access_token(settings) or "",
                                  {"tunnel": False})
        status = _status(settings, stack)
        status.steps = steps
        status.restored = restored
        return status


def _is_empty(folder: Path) -> bool:
    return not folder.exists() or not any(folder.iterdir())


def _check_snapshot_dir(settings: Settings) -> str:
    try:
        snapshot.check_destination(settings.snapshot_dir, create=True)
    except SnapshotError as exc:
        raise SnapshotError(exc.message, hint=(exc.hint + "; " if exc.hint else "") +
                            "or run with --no-snapshots for local-only mode (the database then dies "
                            "with this machine)") from exc
    count = sum(1 for g in snapshot.list_generations(settings.snapshot_dir) if g.ok)
    return f"publishing to {settings.snapshot_dir} ({count} good generation(s) there)"


def _restore_if_any(settings: Settings, holder: dict, progress: Progress) -> str:
    if not any(g.ok for g in snapshot.list_generations(settings.snapshot_dir)):
        return "nothing to restore: a new database will be created"
    progress(f"restoring the newest good snapshot from {settings.snapshot_dir}")
    report = snapshot.restore(settings.snapshot_dir, settings.pgdata_dir)
    taken = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(report.created))
    sentence = f"restored the database from snapshot {report.generation} (taken {taken}) in {settings.snapshot_dir}"
    if report.skipped:
        sentence += "; skipped " + "; ".join(f"{gen} ({why})" for gen, why in report.skipped)
    holder["restored"] = sentence
    return sentence


def access_token(settings: Settings) -> str | None:
    """The token browsers and API clients present (created on first use); None when access control is off."""
    return None if settings.no_auth else read_or_create_secret(settings.token_file)


def _start_tunnel(settings: Settings) -> str:
    token = access_token(settings)
    info = tunnel.start_tunnel(settings, token=token or "", cloudflared=settings.cloudflared)
    return f"public URL {info.url}"


def _tunnel_running(settings: Settings) -> bool:
    info = tunnel.read_tunnel_state(settings)
    return info is not None and tunnel.tunnel_alive(info)


def restart_dead(settings: Settings, report: Reporter = lambda _: None,
                 skip: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """Start again any service (and the tunnel) that died since `up`; for the monitor.

    Does nothing while another command holds the stack, and nothing once `down` ran.
    """
    try:
        with _lock(settings, "monitor"):
            return _restart_dead(settings, report, skip)
    except StackBusy:
        return []


def _restart_dead(settings: Settings, report: Reporter, skip: set[str] | frozenset[str]) -> list[str]:
    stack = _load(settings)
    restarted = []
    for service in stack.services:
        if service.name in skip or service.name == "monitor" or _recorded(settings, service.name) is None:
            continue
        if _live_pid(settings, service.name) is None:
            report(Event(service.name, "died; starting it again"))
            _start(stack, service, lambda line, n=service.name: report(Event(n, line)))
            restarted.append(service.name)
    if ("tunnel" not in skip and settings.tunnel and tunnel.read_tunnel_state(settings) is not None
            and not _tunnel_running(settings)):
        report(Event("tunnel", "cloudflared exited; starting a new tunnel"))
        report(Event("tunnel", _start_tunnel(settings)))
        restarted.append("tunnel")
    return restarted


def _prepare_runtime(settings: Settings, holder: dict, progress: Progress) -> str:
    holder["stack"] = stack = _load(settings, progress)
    engine = "system proot" if "UDOCKER_USE_PROOT_EXECUTABLE" in stack.udocker.engine_env else "udocker engine"
    return f"udocker ready ({engine})"


def _check_root(settings: Settings) -> None:
    for folder in (settings.root, settings.pgdata_dir.parent):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".write-test-{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise ConfigError(f"{folder} is not writable: {exc.strerror}",
                              hint="choose another folder with MF_ROOT / PGDATA_DIR (or --root / --pgdata-dir)") from exc
    for sub in (settings.logs_dir, settings.state_dir, settings.secrets_dir, settings.datastore_dir):
        sub.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):  # Google Drive's FUSE folder keeps no modes
        settings.secrets_dir.chmod(0o700)


def _pull_images(stack: _Stack, progress: Progress) -> str:
    refs = list(dict.fromkeys(s.image for s in stack.services if s.image))
    missing = [ref for ref in refs if not stack.udocker.has_image(ref)]
    if missing:
        _check_space(stack.settings.udocker_dir, PULL_SPACE_BYTES, "pulling images")
    pulled = [ref for ref in missing if stack.udocker.pull(ref, stack.settings.registry, progress)]
    created = 0
    for service in stack.services:
        if service.container and service.image:
            created += stack.udocker.ensure_container(service.image, service.container, progress)
    parts = [f"pulled {len(pulled)}" if pulled else "nothing to pull"]
    if created:
        parts.append(f"created {created} container(s)")
    return ", ".join(parts)


def _check_space(folder: Path, needed: int, doing: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise StackError(f"not enough free disk space for {doing}: {free / 1e9:.1f} GB free under {folder}, "
                         f"about {needed / 1e9:.1f} GB needed", hint="free some space or point UDOCKER_DIR elsewhere")


def _start(stack: _Stack, service: Service, progress: Progress) -> str | None:
    settings = stack.settings
    pid = _live_pid(settings, service.name)
    if pid is not None and healthy(service.health):
        detail = "already running"
    else:
        if pid is not None:
            progress(f"pid {pid} is not healthy; restarting it")
            _stop(stack, service, pid)
        _check_port(service)
        _prepare_files(service)
        log_path = settings.log_path(service.name)
        pid = procs.spawn(service.argv, log_path=log_path, env={**stack.udocker.env, **service.env})
        _record(settings, service, pid)
        _wait_healthy(settings, service, pid, log_path)
        detail = f"healthy on port {service.port} (pid {pid})" if service.port else f"running (pid {pid})"
    if service.on_ready:
        extra = service.on_ready(progress)
        if extra:
            detail = f"{detail}; {extra}"
    return detail


def _prepare_files(service: Service) -> None:
    for folder in service.host_dirs:
        folder.mkdir(parents=True, exist_ok=True)
    for path, text in service.secret_files.items():
        # Services of one wave may share a file: each writer gets its own temporary name.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        tmp.replace(path)


def _check_port(service: Service) -> None:
    if not service.port:
        return
    holder = procs.listener_of(service.port)
    if holder is None:
        return
    pid, command = holder
    who = f"pid {pid} ({command[:120]})" if pid else command
    raise PortInUse(f"port {service.port}, needed by the {service.title}, is already taken by {who}",
                    hint=f"stop that process, or give the {service.title} another port (see `installer config`)")


def _wait_healthy(settings: Settings, service: Service, pid: int, log_path: Path) -> None:
    deadline = time.monotonic() + settings.start_timeout
    delay = 0.05
    while time.monotonic() < deadline:
        if healthy(service.health, timeout=2.0):
            return
        if not procs.alive(pid):
            procs.wait_gone([pid], 0)
            raise ServiceFailed(f"the {service.title} exited during start-up", log=log_path,
                                log_tail=procs.tail(log_path),
                                hint=f"read {log_path}; `installer logs {service.name}` shows it too")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.5)
    raise ServiceFailed(f"the {service.title} did not become healthy within {settings.start_timeout:.0f} s",
                        log=log_path, log_tail=procs.tail(log_path),
                        hint="it is left running for inspection; `installer down` stops it")


def _all_running(settings: Settings, stack: _Stack) -> bool:
    if not all(_live_pid(settings, s.name) is not None for s in stack.services):
        return False
    if settings.tunnel and not _tunnel_running(settings):
        return False
    return all(healthy(s.health) for s in stack.services if s.name == "proxy")


# --- down ----------------------------------------------------------------------


def down(settings: Settings, report: Reporter = lambda _: None) -> list[str]:
    """Stop every service in reverse order; verify that nothing of the stack is left running."""
    with _lock(settings, "down"):
        stack = _load(settings)
        stopped = []
        if tunnel.stop_recorded_tunnel(settings):
            stopped.append("tunnel")
            report(Event("tunnel", "stopped", 0.0))
        tunnel.state_path(settings).unlink(missing_ok=True)
        for service in reversed(stack.services):
            pid = _live_pid(settings, service.name)
            if pid is None:
                _state_file(settings, service.name).unlink(missing_ok=True)
                continue
            report(Event(service.name, "stopping"))
            began = time.monotonic()
            if service.before_stop:
                try:
                    detail = service.before_stop(lambda line, n=service.name: report(Event(n, line)))
                    if detail:
                        report(Event(service.name, detail))
                except StackError as exc:
                    # Stopping must go on; the watcher's last snapshot stays the newest good one.
                    report(Event(service.name, f"final snapshot failed: {exc.message}"))
            _stop(stack, service, pid)
            _state_file(settings, service.name).unlink(missing_ok=True)
            stopped.append(service.name)
            report(Event(service.name, "stopped", time.monotonic() - began))
        return stopped


def _stop(stack: _Stack, service: Service, pid: int) -> None:
    """Stop one service the way that works for it, then prove nothing of it is left."""
    members = [pid] + [p.pid for p in procs.descendants(pid)]
    if service.stop is StopPolicy.HOST_TERM:
        procs.terminate(pid, STOP_TIMEOUT)
    elif service.stop is StopPolicy.POSTMASTER:
        postmaster = _postmaster_pid(stack.settings.pgdata_dir)
        if postmaster is not None:
            procs.send(postmaster, signal.SIGINT)
            procs.wait_gone([postmaster], STOP_TIMEOUT)
    elif service.stop is StopPolicy.GUEST_TERM:
        guests = [p.pid for p in procs.descendants(pid) if service.guest_marker in p.command
                  and not _is_runtime_process(p)]
        for guest in guests:
            procs.send(guest, signal.SIGTERM)
        procs.wait_gone(guests, STOP_TIMEOUT)
    elif service.stop is StopPolicy.GUEST_KILL:
        # It ignores SIGTERM; stop every guest first so no worker is re-spawned, then kill them.
        guests = [p.pid for p in procs.descendants(pid) if not _is_runtime_process(p)]
        for guest in guests:
            procs.send(guest, signal.SIGSTOP)
        procs.kill_tree(guests)
    # udocker exits by itself once its guest is gone; give it a moment, then make sure.
    left = procs.wait_gone(members, 5.0)
    if left:
        left = procs.kill_tree(left)
    if left:
        raise ServiceFailed(f"could not stop the {service.title}: processes {left} are still running",
                            hint="stop them by hand (kill -9) and run `installer down` again")


def _is_runtime_process(info: procs.ProcInfo) -> bool:
    head = " ".join(info.cmdline[:2])
    return "udocker" in head or "proot" in (info.cmdline[0] if info.cmdline else "")


def _postmaster_pid(pgdata: Path) -> int | None:
    try:
        first = (pgdata / "postmaster.pid").read_text().splitlines()[0]
        pid = int(first)
    except (OSError, ValueError, IndexError):
        return None
    return pid if procs.alive(pid) else None


# --- status --------------------------------------------------------------------


def status(settings: Settings) -> StackStatus:
    return _status(settings, _load(settings))


def _status(settings: Settings, stack: _Stack) -> StackStatus:
    rows = []
    for service in stack.services:
        pid = _live_pid(settings, service.name)
        data = _recorded(settings, service.name)
        if pid is not None:
            state = "running"
        elif data is not None and data.get("boot_id") == procs.boot_id():
            state = "dead"  # started on this machine and gone without `down`: its log says why
        else:
            state = "stopped"
        is_healthy = pid is not None and healthy(service.health, timeout=2.0)
        uptime = time.time() - data["started"] if pid is not None and data else None
        rows.append(ServiceStatus(service.name, service.title, state, pid, service.port, is_healthy,
                                  None if uptime is None else round(uptime, 1),
                                  str(settings.log_path(service.name))))
    version = None
    if rows and rows[0].healthy:
        with contextlib.suppress(psycopg.Error):
            with psycopg.connect(dsn(settings, stack.secrets.db_password)) as conn:
                version = schema.current_version(conn)
    base = f"http://127.0.0.1:{settings.port}"
    urls = {"ui": f"{base}/", "metadata_service": f"{base}/service", "ui_backend": f"{base}/api"}
    saved = read_connection_file(settings.root)
    if saved and saved.get("tunnel"):
        urls["public"] = saved["url"]
    return StackStatus(str(settings.root), rows, version, urls, snapshot=_snapshot_summary(settings),
                       connection_string=saved.get("connection_string") if saved else None,
                       image_metaflow_version=_image_metaflow_version(stack))


def _image_metaflow_version(stack: _Stack) -> str | None:
    root = stack.udocker.container_root(service_container(stack.settings))
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


def take_snapshot(settings: Settings) -> snapshot.Generation:
    """A snapshot now, while PostgreSQL runs; recorded where `status` looks."""
    if settings.no_snapshots:
        raise ConfigError("snapshots are off (--no-snapshots)", hint="start the stack without --no-snapshots")
    if _live_pid(settings, "postgres") is None:
        raise StackError("PostgreSQL is not running; a snapshot needs it",
                         hint="run `up` first (`down` already took a final snapshot)")
    _check_snapshot_dir(settings)
    secrets = _secrets(settings)
    generation = snapshot.take_snapshot(dsn(settings, secrets.db_password, dbname="postgres"),
                                        settings.pgdata_dir, settings.snapshot_dir, settings.snapshot_keep)
    _record_snapshot(settings, generation)
    return generation


def _record_snapshot(settings: Settings, generation: snapshot.Generation) -> None:
    path = snapshot_status_file(settings)
    recorded = snapshot.read_status(path) or snapshot.SnapshotStatus(state="stopped")
    recorded.last_id, recorded.last_at, recorded.last_size = generation.id, generation.created, generation.size
    recorded.last_uploaded, recorded.last_duration_s = generation.uploaded, generation.duration_s
    recorded.last_error = recorded.last_error_at = None
    recorded.snapshots += 1
    recorded.updated_at = time.time()
    snapshot.write_status(path, recorded)


def restore(settings: Settings, force: bool = False) -> snapshot.RestoreReport:
    """Restore the newest good snapshot into PGDATA_DIR; the stack must be down."""
    with _lock(settings, "restore"):
        if _live_pid(settings, "postgres") is not None:
            raise StackError("PostgreSQL is running on this data folder", hint="run `down` first")
        snapshot.check_destination(settings.snapshot_dir, writable=False)
        return snapshot.restore(settings.snapshot_dir, settings.pgdata_dir, force=force)


def service_names(settings: Settings) -> list[str]:
    return [s.name for s in _load(settings).services]
