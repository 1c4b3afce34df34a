"""The one place that knows the stack's services, as data.

Each Service says what runs (image and command, or a host command), with which
environment, on which port, how to tell it is healthy, how to stop it cleanly,
and what to do once it is up. `define()` lists them in start order; `down`
walks the list backwards.
"""

from __future__ import annotations

import enum
import hashlib
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .objectstore import objectstore_service_argv, socket_path, ui_backend_env
from .runtime import Udocker, container_name
from .settings import Settings

PG_GUEST_DATA = "/var/lib/postgresql/data"
PG_BIN = "/usr/lib/postgresql/15/bin"
DB_NAME = "metaflow"
DB_USER = "postgres"
SERVICE_PYTHON = "/opt/latest/bin/python3"
UI_BUNDLE_IN_IMAGE = "root/services/ui_backend_service/ui"
# Our sitecustomize for the UI backend's Pythons (see installer/ui_backend_site), mounted read-only.
UI_BACKEND_SITE = Path(__file__).resolve().parent / "ui_backend_site"
UI_BACKEND_SITE_IN_GUEST = "/opt/mfstack-ui-backend-site"
# Set in every container's environment, so that its processes can be found when they outlive their
# proot (Debian's proot has no --kill-on-exit): the stack stops them before it starts that service again.
GUEST_TAG = "MFSTACK_GUEST"

# PostgreSQL settings: loopback only, WAL kept usable for base backups (snapshots),
# and sized for a small notebook VM.
PG_SETTINGS: Mapping[str, str] = {
    "listen_addresses": "127.0.0.1",
    "unix_socket_directories": "",
    "wal_level": "replica",
    "max_wal_senders": "2",
    "wal_keep_size": "256MB",
    "full_page_writes": "on",
    "shared_buffers": "128MB",
    "max_connections": "60",
    # No logical replication here: without workers, PostgreSQL starts no launcher process for them.
    "max_logical_replication_workers": "0",
    "password_encryption": "scram-sha-256",
}

# The UI backend's defaults (16/16/8 cache workers) are meant for a large server.
UI_BACKEND_TUNING: Mapping[str, str] = {
    "CACHE_ARTIFACT_MAX_ACTIONS": "1",
    "CACHE_DAG_MAX_ACTIONS": "1",
    "CACHE_LOG_MAX_ACTIONS": "1",
    "CACHE_ARTIFACT_STORAGE_LIMIT": "256000000",
    "CACHE_DAG_STORAGE_LIMIT": "64000000",
    "CACHE_LOG_STORAGE_LIMIT": "64000000",
    "PREFETCH_RUNS_LIMIT": "1",
    # Each cache server forks its pool's workers for work and lets them go after this long idle
    # (our sitecustomize; upstream keeps them from the start).
    "MFSTACK_CACHE_POOL_IDLE_S": "30",
    # The UI backend opens five pools (queries, cache, listen/notify, heartbeats, websockets); with a
    # minimum of 0 each connects when first used instead of holding an idle PostgreSQL backend
    # (~18 MiB each) from the start.
    "MF_METADATA_DB_POOL_MIN": "0",
    "MF_METADATA_DB_POOL_MAX": "4",
}


class StopPolicy(enum.Enum):
    """How a service is stopped without leaving anything behind (see upstream-facts: udocker)."""

    POSTMASTER = "SIGINT to the postmaster named in postmaster.pid"
    GUEST_TERM = "SIGTERM to the guest process itself, never to udocker"
    GUEST_KILL = "SIGSTOP then SIGKILL every guest process of the group"
    HOST_TERM = "SIGTERM to the process group, then SIGKILL"


@dataclass(frozen=True)
class Health:
    """How to ask a service whether it is ready: a PostgreSQL query or an HTTP GET."""

    kind: str  # "postgres", "http", "unix-http" (HTTP on a unix socket), or "process" (alive is enough)
    target: str  # a DSN, a URL or a socket path
    expect: str = ""  # for http: a substring the body must contain
    # for postgres: its postmaster.pid, whose status line says "ready" before a connection is tried
    # (a connection while it starts would only leave a FATAL line in its log)
    ready_file: Path | None = None


@dataclass(frozen=True)
class Service:
    name: str
    title: str
    port: int
    argv: tuple[str, ...]
    health: Health
    stop: StopPolicy
    image: str | None = None
    container: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    guest_marker: str | None = None
    guest_tag: str | None = None  # the value of GUEST_TAG in a container's environment
    secret_files: Mapping[Path, str] = field(default_factory=dict)  # written 0600 before start, never in argv
    host_dirs: tuple[Path, ...] = ()  # bind-mounted folders that must exist before start
    depends_on: tuple[str, ...] = ()
    # False: `up` starts it and goes on; it becomes healthy on its own (the monitor restarts it if it dies).
    awaited: bool = True
    on_ready: Callable[[Progress], str | None] | None = None
    before_stop: Callable[[Progress], str | None] | None = None


Progress = Callable[[str], None]


@dataclass(frozen=True)
class Secrets:
    db_password: str
    token_file: Path
    s3_internal_file: Path  # the UI backend's own object-store key: a token rotation leaves it alone
    s3_internal: str


def dsn(settings: Settings, password: str, dbname: str = DB_NAME) -> str:
    return (f"host=127.0.0.1 port={settings.db_port} user={DB_USER} password={password} "
            f"dbname={dbname} connect_timeout=5")


def guest_tag(settings: Settings, name: str) -> str:
    root = hashlib.sha256(str(settings.root.resolve()).encode()).hexdigest()[:12]
    return f"{root}/{name}"


def service_container(settings: Settings) -> str:
    return container_name("service", settings.service_image)


def postgres_container(settings: Settings) -> str:
    return container_name("postgres", settings.postgres_image)


def ui_bundle_dir(settings: Settings, udocker: Udocker) -> Path:
    return udocker.container_root(service_container(settings)) / UI_BUNDLE_IN_IMAGE


def migrations_dir(settings: Settings, udocker: Udocker) -> Path:
    from .schema import MIGRATIONS_IN_IMAGE

    return udocker.container_root(service_container(settings)) / MIGRATIONS_IN_IMAGE


def _postgres_script() -> str:
    """Start-up script run inside the PostgreSQL container: first start creates the cluster."""
    flags = " ".join(f"-c {key}='{value}'" for key, value in PG_SETTINGS.items())
    return (
        "set -e\n"
        f"mkdir -p {PG_GUEST_DATA}\n"
        # Files restored from a snapshot, or a folder created by the host, belong to the host user.
        f"chown -R postgres:postgres {PG_GUEST_DATA}\n"
        f"chmod 700 {PG_GUEST_DATA}\n"
        f"if [ ! -s {PG_GUEST_DATA}/PG_VERSION ]; then\n"
        "  umask 077\n"
        '  printf "%s" "$MFSTACK_DB_PASSWORD" > /tmp/.mfstack-pw\n'
        "  chown postgres /tmp/.mfstack-pw\n"
        f"  runuser -u postgres -- {PG_BIN}/initdb -D {PG_GUEST_DATA} -U {DB_USER} --pwfile=/tmp/.mfstack-pw "
        "--auth=scram-sha-256 --encoding=UTF8 --locale=C.UTF-8\n"
        "  rm -f /tmp/.mfstack-pw\n"
        "fi\n"
        "unset MFSTACK_DB_PASSWORD\n"
        f"exec runuser -u postgres -- {PG_BIN}/postgres -D {PG_GUEST_DATA} -c port=$MFSTACK_DB_PORT {flags}\n"
    )


def _database_env(settings: Settings) -> dict[str, str]:
    return {
        "MF_METADATA_DB_HOST": "127.0.0.1",
        "MF_METADATA_DB_PORT": str(settings.db_port),
        "MF_METADATA_DB_USER": DB_USER,
        "MF_METADATA_DB_NAME": DB_NAME,
    }


def waves(services: list[Service]) -> list[list[Service]]:
    """Services grouped so that each group needs only earlier groups: a group starts together."""
    placed: dict[str, int] = {}
    groups: list[list[Service]] = []
    for service in services:
        level = 1 + max((placed[name] for name in service.depends_on), default=-1)
        placed[service.name] = level
        if level == len(groups):
            groups.append([])
        groups[level].append(service)
    return groups


@dataclass(frozen=True)
class Hooks:
    """What the stack does around a service's life: set the database up, take the final snapshot."""

    prepare_database: Callable[[Progress], str | None]
    final_snapshot: Callable[[Progress], str | None]


def _env_file(values: Mapping[str, str]) -> str:
    return "".join(f"{key}={value}\n" for key, value in values.items())


def define(settings: Settings, udocker: Udocker, secrets: Secrets, hooks: Hooks) -> list[Service]:
    """The stack, in start order."""
    service_box = service_container(settings)
    datastore = str(settings.datastore_dir)
    ui_cache = settings.cache_dir / "ui-backend"
    pg_env_file = settings.secrets_dir / "postgres.env"
    db_env_file = settings.secrets_dir / "service-db.env"
    ui_env_file = settings.secrets_dir / "ui-backend.env"
    db_secret = {db_env_file: _env_file({"MF_METADATA_DB_PSWD": secrets.db_password})}
    s3_socket = socket_path(settings.root)
    # The UI backend reads runs' artifacts, logs and cards through the entry point's /s3 route.
    s3_plain, s3_secret = ui_backend_env(settings.port, secrets.s3_internal)
    tags = {name: guest_tag(settings, name) for name in ("postgres", "metadata", "ui-backend")}
    postgres = Service(
        name="postgres",
        title="PostgreSQL",
        port=settings.db_port,
        image=settings.postgres_image,
        container=postgres_container(settings),
        argv=tuple(udocker.run_argv(
            postgres_container(settings), ["/bin/bash", "-c", _postgres_script()],
            env={"MFSTACK_DB_PORT": str(settings.db_port), GUEST_TAG: tags["postgres"]},
            env_file=pg_env_file,
            volumes=[(settings.pgdata_dir, PG_GUEST_DATA)])),
        secret_files={pg_env_file: _env_file({"MFSTACK_DB_PASSWORD": secrets.db_password})},
        host_dirs=(settings.pgdata_dir,),
        health=Health("postgres", dsn(settings, secrets.db_password, dbname="postgres"),
                      ready_file=settings.pgdata_dir / "postmaster.pid"),
        stop=StopPolicy.POSTMASTER,
        guest_tag=tags["postgres"],
        on_ready=hooks.prepare_database,
        before_stop=hooks.final_snapshot,
    )
    metadata = Service(
        name="metadata",
        title="metadata service",
        port=settings.metadata_port,
        image=settings.service_image,
        container=service_box,
        argv=tuple(udocker.run_argv(
            service_box, [SERVICE_PYTHON, "-m", "services.metadata_service.server"],
            env={**_database_env(settings), "MF_METADATA_HOST": "127.0.0.1",
                 "MF_METADATA_PORT": str(settings.metadata_port), GUEST_TAG: tags["metadata"]},
            env_file=db_env_file,
            volumes=[(settings.datastore_dir, datastore)], workdir="/root")),
        secret_files=db_secret,
        host_dirs=(settings.datastore_dir,),
        health=Health("http", f"http://127.0.0.1:{settings.metadata_port}/ping", expect="pong"),
        stop=StopPolicy.GUEST_TERM,
        guest_marker="services.metadata_service.server",
        guest_tag=tags["metadata"],
        depends_on=("postgres",),
    )
    ui_backend = Service(
        name="ui-backend",
        title="UI backend",
        port=settings.ui_port,
        image=settings.service_image,
        container=service_box,
        argv=tuple(udocker.run_argv(
            service_box, ["/bin/sh", "-c",
                          f"mkdir -p {ui_cache} && cd {ui_cache} && "
                          f"exec {SERVICE_PYTHON} -m services.ui_backend_service.ui_server"],
            env={**_database_env(settings), **UI_BACKEND_TUNING,
                 "MF_UI_METADATA_HOST": "127.0.0.1", "MF_UI_METADATA_PORT": str(settings.ui_port),
                 "PATH_PREFIX": "/api", "UI_ENABLED": "0",
                 "METAFLOW_CLIENT_CACHE_PATH": f"{ui_cache}/metaflow_client",
                 "CARD_CACHE_STORAGE_PATH": f"{ui_cache}/cards",
                 "PYTHONPATH": f"{UI_BACKEND_SITE_IN_GUEST}:/root", **s3_plain,
                 # Runs made with the local datastore stay readable at the path they recorded.
                 "METAFLOW_DATASTORE_SYSROOT_LOCAL": datastore, GUEST_TAG: tags["ui-backend"]},
            env_file=ui_env_file,
            volumes=[(settings.datastore_dir, datastore), (ui_cache, str(ui_cache)),
                     (UI_BACKEND_SITE, UI_BACKEND_SITE_IN_GUEST)])),
        secret_files={ui_env_file: _env_file({"MF_METADATA_DB_PSWD": secrets.db_password, **s3_secret})},
        host_dirs=(settings.datastore_dir, ui_cache),
        health=Health("http", f"http://127.0.0.1:{settings.ui_port}/api/ping", expect="pong"),
        stop=StopPolicy.GUEST_KILL,
        guest_tag=tags["ui-backend"],
        depends_on=("postgres",),
        # Flows need only PostgreSQL, the metadata service, the object store and the entry point: `up`
        # returns once those answer, and the entry point shows a "UI starting" page until this one does.
        awaited=settings.wait_ui,
    )
    proxy_argv = [sys.executable, "-m", "installer.proxy",
                  "--listen-host", settings.bind, "--listen-port", str(settings.port),
                  "--metadata-url", f"http://127.0.0.1:{settings.metadata_port}",
                  "--ui-backend-url", f"http://127.0.0.1:{settings.ui_port}",
                  "--static-dir", str(ui_bundle_dir(settings, udocker)),
                  "--token-file", str(secrets.token_file),
                  "--s3-socket", str(s3_socket), "--s3-internal-secret-file", str(secrets.s3_internal_file)]
    if settings.no_auth:
        proxy_argv.append("--no-auth")
    if settings.tunnel:
        proxy_argv.append("--behind-tunnel")  # cloudflared connects from loopback; see installer/edge/access.py
    proxy = Service(
        name="proxy",
        title="entry point (reverse proxy)",
        port=settings.port,
        argv=tuple(proxy_argv),
        health=Health("http", f"http://127.0.0.1:{settings.port}/healthz", expect="ok"),
        stop=StopPolicy.HOST_TERM,
        # Started beside the metadata service, not after it: its health check answers "ok" only once
        # the metadata service and the object store answer through it, so `up` waits for both anyway.
        depends_on=("objectstore",),
    )
    objectstore = Service(
        name="objectstore",
        title="object store (S3)",
        port=0,
        argv=objectstore_service_argv(
            settings.objects_dir, s3_socket,
            token_file=None if settings.no_auth else secrets.token_file,
            internal_secret_file=None if settings.no_auth else secrets.s3_internal_file),
        host_dirs=(settings.objects_dir,),
        health=Health("unix-http", str(s3_socket)),
        stop=StopPolicy.HOST_TERM,
    )
    services = [postgres, metadata, ui_backend, objectstore, proxy]
    if not settings.no_snapshots:
        dsn_file = settings.secrets_dir / "snapshot.dsn"
        services.append(Service(
            name="snapshots",
            title="snapshot watcher",
            port=0,
            argv=(sys.executable, "-m", "installer.watcher", "--pgdata", str(settings.pgdata_dir),
                  "--dest", str(settings.snapshot_dir), "--dsn-file", str(dsn_file),
                  "--status-file", str(snapshot_status_file(settings)), "--keep", str(settings.snapshot_keep)),
            secret_files={dsn_file: dsn(settings, secrets.db_password, dbname="postgres") + "\n"},
            health=Health("process", ""),
            stop=StopPolicy.HOST_TERM,
            depends_on=("postgres",),
        ))
    services.append(Service(
        name="monitor",
        title="monitor (restarts what dies)",
        port=0,
        argv=(sys.executable, "-m", "installer.monitor", "--root", str(settings.root)),
        health=Health("process", ""),
        stop=StopPolicy.HOST_TERM,
        depends_on=("proxy",),
    ))
    return services


def snapshot_status_file(settings: Settings) -> Path:
    return settings.state_dir / "snapshot-status.json"
