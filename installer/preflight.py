"""What `up` checks before it starts anything: ports, folders, disk space, where images come from.

Every problem found is reported at once (ChecksFailed), each with the setting that fixes it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from . import humanize, procs, runtime, snapshot, state
from .errors import ChecksFailed, ConfigError, PortInUse, SnapshotError, StackError
from .pulls import read_credentials
from .services import Service
from .settings import SETTINGS, Settings

# Free space wanted before pulling: the three unpacked images measured 2.6 GB.
PULL_SPACE_BYTES = 3 * 1024**3
# Free space wanted for PostgreSQL: a new cluster is about 40 MB, and it keeps up to
# wal_keep_size (256 MB) of write-ahead log.
PGDATA_SPACE_BYTES = 300 * 1000**2


def run_checks(settings: Settings, services: list[Service], udocker: runtime.Udocker) -> str:
    """Everything `up` can check before it starts anything; every problem is reported at once."""
    problems: list[StackError] = []

    def check(action: Callable[[], object]) -> None:
        try:
            action()
        except ChecksFailed as exc:
            problems.extend(exc.problems)
        except StackError as exc:
            problems.append(exc)

    not_running = [s for s in services if state.live_pid(settings, s.name) is None]
    for service in not_running:
        check(lambda s=service: check_port(settings, s))
    for folder, name in ((settings.pgdata_dir, "pgdata_dir"), (settings.cache_dir, "cache_dir")):
        check(lambda f=folder, n=name: _check_writable(f, n))
    if not settings.no_snapshots:
        check(lambda: check_snapshot_dir(settings))
    refs = list(dict.fromkeys(s.image for s in services if s.image))
    missing = [ref for ref in refs if not udocker.has_image(ref)]
    if missing:
        check(lambda: _check_space(settings.udocker_dir, PULL_SPACE_BYTES, "pulling images", "udocker_dir"))
        check(lambda: _check_image_source(settings, missing))
    if any(s.name == "postgres" for s in not_running):
        check(lambda: _check_space(settings.pgdata_dir, PGDATA_SPACE_BYTES, "the database", "pgdata_dir"))
    if len(problems) == 1:
        only = problems[0]
        only.hint = f"{only.hint}; nothing was started" if only.hint else "nothing was started"
        raise only
    if problems:
        raise ChecksFailed(problems)
    images = (f"{len(missing)} image(s) to pull from {settings.registry or ', '.join(settings.mirrors)}" if missing
              else "images present")
    return f"ports free, folders writable, enough disk space, {images}"


def _check_image_source(settings: Settings, missing: list[str]) -> None:
    read_credentials(settings.registry_user, settings.registry_password, settings.registry_auth_file)
    if not settings.registry:
        runtime.check_sources(settings.mirrors)
        return
    runtime.check_registry(settings.registry)
    problems: list[StackError] = []
    for ref in missing:
        try:
            runtime.check_image_in_registry(settings.registry, ref)
        except StackError as exc:
            problems.append(exc)
    if len(problems) == 1:
        raise problems[0]
    if problems:
        raise ChecksFailed(problems)


def flag_of(name: str) -> str:
    setting = next(s for s in SETTINGS if s.name == name)
    return f"--{name.replace('_', '-')} ({setting.env})"


def check_snapshot_dir(settings: Settings) -> str:
    try:
        snapshot.check_destination(settings.snapshot_dir, create=True)
    except SnapshotError as exc:
        raise SnapshotError(exc.message, hint=(exc.hint + "; " if exc.hint else "") +
                            "or run with --no-snapshots for local-only mode (the database then dies "
                            "with this machine)") from exc
    count = sum(1 for g in snapshot.list_generations(settings.snapshot_dir) if g.ok)
    return f"publishing to {settings.snapshot_dir} ({count} good generation(s) there)"


def check_root(settings: Settings) -> None:
    _check_writable(settings.root, "root")
    for sub in (settings.logs_dir, settings.state_dir, settings.secrets_dir, settings.datastore_dir):
        sub.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):  # Google Drive's FUSE folder keeps no modes
        settings.secrets_dir.chmod(0o700)


def _check_writable(folder: Path, setting: str) -> None:
    """`folder` exists (created if need be) and takes a file."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"{folder} is not writable: {exc.strerror}",
                          hint=f"choose another folder with {flag_of(setting)}") from exc


def _check_space(folder: Path, needed: int, doing: str, setting: str) -> None:
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise StackError(f"not enough free disk space for {doing}: {humanize.size(free)} free under {folder}, "
                         f"about {humanize.size(needed)} needed",
                         hint=f"free some space, or point {flag_of(setting)} to a larger disk")


_PORT_SETTINGS = ("port", "metadata_port", "ui_port", "db_port")


def check_port(settings: Settings, service: Service) -> None:
    if not service.port:
        return
    holder = procs.listener_of(service.port)
    if holder is None:
        return
    pid, command = holder
    who = f"pid {pid} ({command[:120]})" if pid else command
    raise PortInUse(f"port {service.port}, needed by the {service.title}, is already taken by {who}",
                    hint=port_hint(settings, service))


def port_hint(settings: Settings, service: Service) -> str:
    name = next(n for n in _PORT_SETTINGS if getattr(settings, n) == service.port)
    hint = (f"stop that process, or give the {service.title} another port: {flag_of(name)}, "
            f"e.g. {flag_of(name).split()[0]} {procs.free_port()}")
    if name == "port":
        hint += " (the connection string changes with it: run `connect` again where it was used)"
    return hint
