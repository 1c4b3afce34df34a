"""Bringing the stack up and down, and reporting on it.

`up` returns once every service is healthy (it must: a notebook cell waits on
it), so what is running is recorded on disk, one small JSON file a service
under MF_ROOT/state, and `down`, `status` and `logs` work from any process.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg

from . import humanize, logfiles, procs, runtime, schema, snapshot, state, tunnel
from .connection import write_connection_file
from .errors import ConfigError, ServiceFailed, StackBusy, StackError
from .health import healthy, within_start_up
from .preflight import check_port, check_root, check_snapshot_dir, flag_of, port_hint, run_checks
from .pulls import read_credentials, summary as pull_summary
from .reconcile import reconcile_restored
from .secrets import read_or_create_secret, write_secret
from .services import (DB_NAME, Hooks, Progress, Secrets, Service, define, dsn,
                       migrations_dir, snapshot_status_file, waves)
from .settings import IMAGE_SOURCE, Settings, clear_saved, saved_in_use, saved_settings_file
from .settings import save as save_settings
from .stackstatus import StackStatus, collect
from .startwatch import StartWatch, Wave, start_wave
from .stopping import leftovers, stop


@dataclass(frozen=True)
class Event:
    """One line of progress: a step starting (seconds None) or finished (seconds set)."""

    step: str
    message: str
    seconds: float | None = None


Reporter = Callable[[Event], None]


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
        restored = snapshot.read_marker(settings.pgdata_dir)
        if restored is not None:  # restored: ids the lost window handed out must not come again
            snapshot.advance_sequences(dsn(settings, secrets.db_password, dbname="postgres"), restored.point_time)
        report = schema.apply(dsn(settings, secrets.db_password), migrations_dir(settings, udocker), step_progress)
        applied = f"applied {len(report.applied)} migration(s)" if report.applied else "up to date"
        detail = f"schema version {report.version} ({applied})"
        if restored is not None:
            # Runs whose files did not reach Drive before the runtime died are shown as lost, not finished.
            step_progress("checking the newest finished tasks against the object store")
            lost = reconcile_restored(dsn(settings, secrets.db_password), settings.objects_dir).summary()
            snapshot.clear_marker(settings.pgdata_dir)
            detail += f"; {lost}" if lost else ""
        return detail

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
    with os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600), "a+") as handle:
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


# --- health -------------------------------------------------------------------


# --- up ------------------------------------------------------------------------


def up(settings: Settings, report: Reporter = lambda _: None) -> StackStatus:
    """Start whatever is not running, in order, each confirmed healthy before the next.

    Everything that can be checked is checked before anything starts; if a start still fails,
    what this call started is stopped again (what ran before it is left alone), and only an
    `up` that succeeded saves its settings.
    """
    check_root(settings)
    with _lock(settings, "up"):
        steps: list[dict] = []

        def step(name: str, action: Callable[[Progress], str | None]) -> None:
            report(Event(name, "starting"))
            began = time.monotonic()
            detail = action(lambda line: report(Event(name, line)))
            seconds = time.monotonic() - began
            steps.append({"step": name, "seconds": round(seconds, 2), "detail": detail or ""})
            report(Event(name, detail or "done", seconds))

        previous_token = _apply_token(settings)
        holder: dict = {}
        try:
            step("runtime", lambda p: _prepare_runtime(settings, holder, p))
        except BaseException:
            _restore_token(settings, previous_token)
            raise
        stack: _Stack = holder["stack"]
        saved = saved_in_use(settings)
        if saved:
            report(Event("settings", _saved_notice(settings, saved), 0.0))
        if _all_running(settings, stack):
            if settings.wait_ui:
                _await_ui(stack)
            status = _status(settings, stack)
            status.already_running = True
            return status
        started: list[Service] = []
        try:
            step("checks", lambda p: run_checks(stack.settings, stack.services, stack.udocker))
            step("images", lambda p: _pull_images(stack, p))
            if not settings.no_snapshots:
                step("snapshot-dir", lambda p: check_snapshot_dir(settings))
                if _is_empty(settings.pgdata_dir):
                    step("restore", lambda p: _restore_if_any(settings, holder, p))
            for group in waves(stack.services):
                # Services of one wave need only what already runs: start them side by side.
                start_wave(group, step, lambda s, p, wave: _start(stack, s, p, started, wave))
            if settings.tunnel and not _tunnel_running(settings):
                holder["tunnel"] = True
                step("tunnel", lambda p: _start_tunnel(settings))
            elif not settings.tunnel:
                write_connection_file(settings.root, f"http://127.0.0.1:{settings.port}",
                                      access_token(settings) or "", {"tunnel": False})
        except BaseException as exc:
            account = _undo(stack, started, holder, report)
            _restore_token(settings, previous_token)
            if isinstance(exc, StackError):
                exc.message = f"{exc.message}\n{account}"
            raise
        save_settings(settings)
        status = _status(settings, stack)
        status.steps = steps
        status.restored = holder.get("restored")
        return status


def _apply_token(settings: Settings) -> str | None:
    """Store a token given as a flag or in the environment; returns the one it replaced."""
    if not settings.token:
        return None
    try:
        previous = settings.token_file.read_text().strip()
    except OSError:
        previous = None
    if previous != settings.token:
        write_secret(settings.token_file, settings.token)
    return previous if previous != settings.token else None


def _restore_token(settings: Settings, previous: str | None) -> None:
    if previous:
        write_secret(settings.token_file, previous)


def _saved_notice(settings: Settings, saved: dict[str, str]) -> str:
    shown = ", ".join(f"{name}={value}" for name, value in saved.items())
    line = f"using settings saved by an earlier `up` ({saved_settings_file(settings)}): {shown}"
    if any(name in IMAGE_SOURCE for name in saved):
        line += "; images come from there, not from the defaults"
    return line + "; `python -m installer config --clear` forgets them"


def _undo(stack: _Stack, started: list[Service], holder: dict, report: Reporter) -> str:
    """Stop what this `up` started, newest first; say what that leaves behind."""
    settings = stack.settings
    stopped: list[str] = []

    def say(event: Event) -> None:
        with contextlib.suppress(Exception):  # the reader may be gone (`up | head`): stop all the same
            report(event)

    if holder.get("tunnel") and tunnel.stop_recorded_tunnel(settings):
        tunnel.state_path(settings).unlink(missing_ok=True)
        stopped.append("tunnel")
    order = [s.name for s in stack.services]
    for service in sorted(started, key=lambda s: order.index(s.name), reverse=True):
        pid = state.live_pid(settings, service.name)
        if pid is not None:
            say(Event(service.name, "stopping"))
            began = time.monotonic()
            with contextlib.suppress(StackError):
                stop(service, pid, stack.settings.pgdata_dir)
            say(Event(service.name, "stopped again: this `up` had started it", time.monotonic() - began))
        if state.live_pid(settings, service.name) is None:
            state.forget(settings, service.name)
            stopped.append(service.name)
    left = [s.name for s in stack.services if state.live_pid(settings, s.name) is not None]
    _copy_logs(settings)  # the failed start's output, kept with MF_ROOT for the next machine
    parts = []
    if stopped:
        parts.append(f"`up` stopped what it had started ({', '.join(stopped)})")
    else:
        parts.append("`up` had started nothing")
    if left:
        parts.append(f"still running from before this `up`: {', '.join(left)} (`python -m installer down` "
                     "stops them)")
    else:
        parts.append("nothing of this stack is running")
    if holder.get("restored"):
        parts.append(f"the data folder {settings.pgdata_dir} keeps the database it restored")
    parts.append("no setting was saved")
    return "; ".join(parts) + "."


def _is_empty(folder: Path) -> bool:
    return not folder.exists() or not any(folder.iterdir())


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
        if service.name in skip or service.name == "monitor" or state.recorded(settings, service.name) is None:
            continue
        if state.live_pid(settings, service.name) is None:
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


def _pull_images(stack: _Stack, progress: Progress) -> str:
    settings = stack.settings
    refs = list(dict.fromkeys(s.image for s in stack.services if s.image))
    credentials = read_credentials(settings.registry_user, settings.registry_password,
                                   settings.registry_auth_file)
    found = stack.udocker.pull_all(refs, settings.registry, progress, mirrors=settings.mirrors,
                                   credentials=credentials)
    todo = list({s.container: s for s in stack.services
                 if s.container and s.image and not stack.udocker.has_container(s.container)}.values())
    for number, service in enumerate(todo, 1):
        stack.udocker.ensure_container(service.image, service.container,
                                       lambda line, n=number: progress(f"({n} of {len(todo)}) {line}"))
    parts = [f"pulled {len(found)} ({pull_summary(found)})" if found else "nothing to pull"]
    if todo:
        parts.append(f"created {len(todo)} container(s)")
    return ", ".join(parts)


def _start(stack: _Stack, service: Service, progress: Progress, started: list[Service] | None = None,
           wave: Wave | None = None) -> str | None:
    """Start `service` unless it runs healthy; `started` collects what was started here.

    `wave`: the services starting beside it, whose first failure ends this wait too.
    """
    settings = stack.settings
    pid = state.live_pid(settings, service.name)
    answers = pid is not None and healthy(service.health)
    if pid is not None and not answers and within_start_up(settings, service, state.recorded(settings, service.name)):
        return "already starting"
    if answers:
        detail = "already running"
    else:
        if pid is not None:
            progress(f"pid {pid} is not healthy; restarting it")
            stop(service, pid, stack.settings.pgdata_dir)
        elif leftovers(service):
            progress("stopping what is left of its previous start")
            stop(service, None, stack.settings.pgdata_dir)
        check_port(settings, service)
        _prepare_files(service)
        log_path = settings.log_path(service.name)
        offset = logfiles.size(log_path)
        pid = procs.spawn(service.argv, log_path=log_path, env={**stack.udocker.env, **service.env})
        state.record(settings, service.name, pid)
        if started is not None:
            started.append(service)
        watch = StartWatch(service, pid, log_path, offset, lambda: port_hint(settings, service))
        if not service.awaited:
            _watch_beside(watch, wave)
            return f"starting on port {service.port} (pid {pid}); `status` says when it is ready"
        _wait_healthy(settings, watch, wave)
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


def _wait_healthy(settings: Settings, watch: StartWatch, wave: Wave | None = None) -> None:
    """Until healthy; a death, a port taken by another process, or a failure in `wave` ends it at once."""
    service, log_path = watch.service, watch.log_path
    deadline = time.monotonic() + settings.start_timeout
    delay = 0.05
    while time.monotonic() < deadline:
        if healthy(service.health, timeout=2.0):
            return
        problem = watch.problem()
        if problem is not None:
            raise problem
        if wave is not None:
            wave.check()
        time.sleep(delay)
        delay = min(delay * 1.5, 0.2)  # a check is a few ms; waiting longer only delays `up`
    raise ServiceFailed(f"the {service.title} did not become healthy within {settings.start_timeout:.0f} s",
                        log=log_path, log_tail=procs.tail(log_path),
                        hint=f"read {log_path} (`python -m installer logs {service.name}`); on a slow "
                             f"machine a longer {flag_of('start_timeout')} may help")


def _watch_beside(watch: StartWatch, wave: Wave | None) -> None:
    """A service `up` does not wait for: watched while the services of its wave start, then once more."""
    while wave is not None and not wave.settled.is_set():
        problem = watch.problem()
        if problem is not None:
            raise problem
        wave.check()
        wave.settled.wait(0.2)
    problem = watch.problem(force_port_check=True)
    if problem is not None:
        raise problem


def _await_ui(stack: _Stack) -> None:
    """For `up --wait-ui` on a stack whose UI backend is still starting."""
    for service in stack.services:
        pid = state.live_pid(stack.settings, service.name)
        if service.name == "ui-backend" and pid is not None:
            log_path = stack.settings.log_path(service.name)
            _wait_healthy(stack.settings, StartWatch(service, pid, log_path, logfiles.size(log_path),
                                                     lambda s=service: port_hint(stack.settings, s)))


def _all_running(settings: Settings, stack: _Stack) -> bool:
    if not all(state.live_pid(settings, s.name) is not None for s in stack.services):
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
            pid = state.live_pid(settings, service.name)
            if pid is None:
                if leftovers(service):
                    report(Event(service.name, "stopping what is left of it"))
                    stop(service, None, stack.settings.pgdata_dir)
                    stopped.append(service.name)
                state.forget(settings, service.name)
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
            stop(service, pid, stack.settings.pgdata_dir)
            state.forget(settings, service.name)
            stopped.append(service.name)
            report(Event(service.name, "stopped", time.monotonic() - began))
        _copy_logs(settings)  # the monitor, which copies them while the stack runs, is stopped
        return stopped


def _copy_logs(settings: Settings) -> None:
    with contextlib.suppress(OSError):  # the live logs keep everything; the next copy catches up
        logfiles.tend(settings.live_logs_dir, settings.logs_dir, settings.log_max_mb)


# --- status --------------------------------------------------------------------


def status(settings: Settings) -> StackStatus:
    return _status(settings, _load(settings))


def _status(settings: Settings, stack: _Stack) -> StackStatus:
    return collect(settings, stack.services, stack.secrets.db_password, stack.udocker)


def take_snapshot(settings: Settings) -> snapshot.Generation:
    """A snapshot now, while PostgreSQL runs; recorded where `status` looks."""
    if settings.no_snapshots:
        raise ConfigError("snapshots are off (--no-snapshots)", hint="start the stack without --no-snapshots")
    if state.live_pid(settings, "postgres") is None:
        raise StackError("PostgreSQL is not running; a snapshot needs it",
                         hint="run `up` first (`down` already took a final snapshot)")
    check_snapshot_dir(settings)
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
        if state.live_pid(settings, "postgres") is not None:
            raise StackError("PostgreSQL is running on this data folder", hint="run `down` first")
        snapshot.check_destination(settings.snapshot_dir, writable=False)
        return snapshot.restore(settings.snapshot_dir, settings.pgdata_dir, force=force)


def forget_settings(settings: Settings) -> dict[str, str]:
    """Forget what `up` saved; refused while services of this stack run (they were started with it)."""
    with _lock(settings, "config --clear"):
        running = sorted(path.stem for path in settings.state_dir.glob("*.json")
                         if state.live_pid(settings, path.stem) is not None)
        if running:
            raise StackError(f"the stack is running ({', '.join(running)}) with the saved settings",
                             hint="run `python -m installer down` first, then clear them")
        return clear_saved(settings)


def service_names(settings: Settings) -> list[str]:
    return [s.name for s in _load(settings).services]
