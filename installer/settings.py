"""The one place that reads settings: flags > environment > saved by `up` > defaults.

Each setting is declared once in SETTINGS (name, environment variable, default,
help); the CLI builds its flags from the same table, and `installer config`
shows every resolved value with where it came from.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .procs import open_private
from .pulls import DEFAULT_MIRRORS, parse_source

PACKAGE_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Setting:
    name: str
    env: str
    help: str
    default: Callable[[dict[str, Any]], Any]
    parse: Callable[[str], Any] = str
    on_command_line: bool = True  # False for secrets: a command line is visible to every user in `ps`

    @property
    def switch(self) -> bool:
        """A yes/no setting: a flag without a value on the command line."""
        return self.parse is _flag


def _path(value: str) -> Path:
    return Path(value).expanduser().resolve()


def _number(convert: Callable[[str], Any], what: str, low: float, high: float | None = None,
            hint: str | None = None) -> Callable[[str], Any]:
    """A parser for numbers in [low, high] that says what it wanted."""
    def parse(value: str) -> Any:
        try:
            number = convert(value)
        except ValueError:
            raise ConfigError(f"not {what}: {value!r}") from None
        if number < low or (high is not None and number > high):
            limits = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise ConfigError(f"{what} out of range ({limits}): {number}", hint=hint)
        return number
    return parse


_port = _number(int, "a port number", 1, 65535, hint="use a number between 1024 and 65535")
_count = _number(int, "a whole number", 1)
_seconds = _number(float, "a number of seconds", 0.1)


def _flag(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"not a yes/no value: {value!r}")


def _mirrors(value: str) -> tuple[str, ...]:
    entries = tuple(entry.strip() for entry in value.split(",") if entry.strip())
    for entry in entries:
        try:
            parse_source(entry)
        except ValueError as exc:
            raise ConfigError(str(exc), hint="a comma-separated list like docker.io,mirror.gcr.io") from None
    if not entries:
        raise ConfigError("the mirrors list is empty", hint="name at least one registry, e.g. docker.io")
    return entries


def production_images() -> dict[str, str]:
    """The pinned image references, from images/production.json (shipped inside the wheel too)."""
    for candidate in (PACKAGE_DIR / "production_images.json", PACKAGE_DIR.parent / "images" / "production.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    raise ConfigError("the pinned image list (images/production.json) is missing from this installation",
                      hint="reinstall the package, or set MF_POSTGRES_IMAGE and MF_SERVICE_IMAGE")


SETTINGS: tuple[Setting, ...] = (
    Setting("root", "MF_ROOT", "folder that holds everything: state, logs, datastore, snapshots",
            lambda s: _path("~/metaflow-stack"), _path),
    Setting("pgdata_dir", "PGDATA_DIR", "PostgreSQL data folder (keep it on local disk, not on Drive)",
            lambda s: s["root"] / "pgdata", _path),
    Setting("port", "MF_PORT", "port of the stack's single entry point (the reverse proxy)",
            lambda s: 7860, _port),
    Setting("bind", "MF_BIND", "address the entry point listens on",
            lambda s: "127.0.0.1"),
    Setting("postgres_image", "MF_POSTGRES_IMAGE", "PostgreSQL 15 image reference",
            lambda s: production_images()["postgres"]),
    Setting("service_image", "MF_SERVICE_IMAGE", "Metaflow service image reference",
            lambda s: production_images()["service"]),
    Setting("registry", "MF_REGISTRY", "pull images from this registry instead of Docker Hub (e.g. http://127.0.0.1:5000)",
            lambda s: None),
    Setting("mirrors", "MF_MIRRORS", "registries asked in order for Docker Hub images, each for the exact tag; "
            "the first one's digest is the reference (host[:port][/namespace], comma-separated)",
            lambda s: _mirrors(",".join(DEFAULT_MIRRORS)), _mirrors),
    Setting("registry_user", "MF_REGISTRY_USER", "user name for the first registry (Docker Hub, or --registry)",
            lambda s: None),
    Setting("registry_password", "MF_REGISTRY_PASSWORD", "password or access token for that user "
            "(environment only, never a flag)", lambda s: None, on_command_line=False),
    Setting("registry_auth_file", "MF_REGISTRY_AUTH_FILE", "a file holding `user:password` for the first "
            "registry (keep it 0600)", lambda s: None, _path),
    Setting("udocker_dir", "UDOCKER_DIR", "udocker's folder: images and containers (several GB; local disk)",
            lambda s: _path("~/.udocker"), _path),
    Setting("metadata_port", "MF_METADATA_PORT", "metadata service port (loopback only)",
            lambda s: 8080, _port),
    Setting("ui_port", "MF_UI_METADATA_PORT", "UI backend port (loopback only)",
            lambda s: 8083, _port),
    Setting("db_port", "MF_DB_PORT", "PostgreSQL port (loopback only)",
            lambda s: 5432, _port),
    Setting("token", "MF_TOKEN", "access token for the entry point (default: generated on first `up`)",
            lambda s: None),
    Setting("no_auth", "MF_NO_AUTH", "serve without access control (only for a stack bound to localhost)",
            lambda s: False, _flag),
    Setting("snapshot_dir", "MF_SNAPSHOT_DIR", "where snapshots are published (Google Drive on Colab)",
            lambda s: s["root"] / "snapshots", _path),
    Setting("no_snapshots", "MF_NO_SNAPSHOTS", "local-only mode: no snapshots (the database dies with this machine)",
            lambda s: False, _flag),
    Setting("snapshot_keep", "MF_SNAPSHOT_KEEP", "snapshot generations to keep",
            lambda s: 5, _count),
    Setting("cache_dir", "MF_CACHE_DIR", "caches that need not survive the machine (keep on local disk)",
            lambda s: _path("~/.cache/metaflow-stack") / hashlib.sha256(str(s["root"]).encode()).hexdigest()[:12],
            _path),
    Setting("log_max_mb", "MF_LOG_MAX_MB", "cap on each service's log, in MB, on local disk and in MF_ROOT/logs",
            lambda s: 4, _count),
    Setting("start_timeout", "MF_START_TIMEOUT", "seconds to wait for each service to become healthy",
            lambda s: 120.0, _seconds),
    Setting("wait_ui", "MF_WAIT_UI", "`up` returns once the UI is ready too (default: once flows can be tracked)",
            lambda s: False, _flag),
    Setting("tunnel", "MF_TUNNEL", "publish the entry point through a Cloudflare quick tunnel",
            lambda s: False, _flag),
    Setting("cloudflared", "MF_CLOUDFLARED", "an existing cloudflared binary (default: download the pinned release)",
            lambda s: None),
)
SAVED_FILE = "settings.json"
# Settings `up` remembers under MF_ROOT, so that later commands talk to the same stack.
_NOT_SAVED = {"root", "token", "wait_ui", "registry_user", "registry_password"}
SAVED = "saved by `up`"
# Where images come from: a saved value here is announced by every `up` that uses it.
IMAGE_SOURCE = ("registry", "mirrors", "postgres_image", "service_image")

_BY_NAME = {setting.name: setting for setting in SETTINGS}


@dataclass(frozen=True)
class Settings:
    root: Path
    pgdata_dir: Path
    port: int
    bind: str
    postgres_image: str
    service_image: str
    registry: str | None
    mirrors: tuple[str, ...]
    registry_user: str | None
    registry_password: str | None
    registry_auth_file: Path | None
    udocker_dir: Path
    metadata_port: int
    ui_port: int
    db_port: int
    token: str | None
    no_auth: bool
    snapshot_dir: Path
    no_snapshots: bool
    snapshot_keep: int
    cache_dir: Path
    log_max_mb: int
    start_timeout: float
    wait_ui: bool
    tunnel: bool
    cloudflared: str | None
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)

    # Folders derived from root; one definition each.
    @property
    def logs_dir(self) -> Path:
        """Copies of the service logs that outlive the machine, in small segments (see installer/logfiles.py)."""
        return self.root / "logs"

    @property
    def live_logs_dir(self) -> Path:
        """The logs services write to: local disk, so that an append is never an upload."""
        return self.cache_dir / "logs"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def secrets_dir(self) -> Path:
        return self.root / "secrets"

    @property
    def datastore_dir(self) -> Path:
        return self.root / "datastore"

    @property
    def objects_dir(self) -> Path:
        """The object store's buckets, one folder each, objects as plain files."""
        return self.root / "objects"

    @property
    def token_file(self) -> Path:
        """The access token: API clients and browsers present it, the S3 keys derive from it."""
        return self.secrets_dir / "token"

    def log_path(self, service: str) -> Path:
        """The log `service` writes to (local disk); MF_ROOT/logs/<service>/ holds its copies."""
        return self.live_logs_dir / f"{service}.log"

    def describe(self) -> list[tuple[str, str, str]]:
        """(name, value, source) for every setting, for `installer config`."""
        rows = []
        for item in fields(self):
            if item.name == "sources":
                continue
            value = getattr(self, item.name)
            source = self.sources.get(item.name, "")
            if item.name == "registry_password" and value:
                value = "***"
            if item.name == "mirrors":
                value = ",".join(value)
            if item.name == "token":
                if value:
                    value = "***"
                elif not self.no_auth and self.token_file.is_file():
                    value, source = "***", f"generated, in {self.token_file}"
            rows.append((item.name, "" if value is None else str(value), source))
        return rows


def resolve(flags: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Resolve every setting: an explicit flag wins, then the environment, then the default."""
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    unknown = set(flags) - set(_BY_NAME)
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    saved: dict[str, Any] = {}
    for setting in SETTINGS:
        if setting.name in flags:
            raw = flags[setting.name]
            values[setting.name] = setting.parse(raw) if isinstance(raw, str) else raw
            sources[setting.name] = "flag"
        elif environ.get(setting.env):
            try:
                values[setting.name] = setting.parse(environ[setting.env])
            except ConfigError as exc:
                raise ConfigError(f"{setting.env}: {exc.message}", hint=exc.hint) from None
            sources[setting.name] = f"env {setting.env}"
        elif setting.name in saved:
            values[setting.name] = setting.parse(saved[setting.name])
            sources[setting.name] = SAVED
        else:
            values[setting.name] = setting.default(values)
            sources[setting.name] = "default"
        if setting.name == "root":
            saved = _read_saved(values["root"])
    if values["registry"]:
        values["registry"] = _normalise_registry(values["registry"])
    ports = {name: values[name] for name in ("port", "metadata_port", "ui_port", "db_port")}
    for port in sorted(set(ports.values())):
        sharing = [f"{name} ({sources[name]})" for name, value in ports.items() if value == port]
        if len(sharing) > 1:
            raise ConfigError(f"port {port} is given to more than one service: {', '.join(sharing)}",
                              hint="give each service its own port")
    return Settings(**values, sources=sources)


def _normalise_registry(url: str) -> str:
    url = url.rstrip("/")
    if "://" not in url:
        url = "https://" + url
    scheme = url.split("://", 1)[0]
    if scheme not in ("http", "https"):
        raise ConfigError(f"registry URL must start with http:// or https://: {url}")
    return url


def _read_saved(root: Path) -> dict[str, Any]:
    try:
        text = (root / "state" / SAVED_FILE).read_text()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"cannot read the saved settings {root / 'state' / SAVED_FILE}: {exc}",
                          hint="delete that file; the next `up` writes it again") from None
    if not text.strip():
        # What a runtime that died leaves on Google Drive when the file's name reached Google and its
        # content did not: nothing was saved.
        return {}
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"cannot read the saved settings {root / 'state' / SAVED_FILE}: {exc}",
                          hint="delete that file; the next `up` writes it again") from None
    return {k: v for k, v in data.items() if k in _BY_NAME and k not in _NOT_SAVED and isinstance(v, str)}


def saved_settings_file(settings: Settings) -> Path:
    return settings.state_dir / SAVED_FILE


def saved_in_use(settings: Settings) -> dict[str, str]:
    """The saved values this resolution took (the flag or variable was not given), by name."""
    return {name: _text(getattr(settings, name)) for name, source in settings.sources.items() if source == SAVED}


def _text(value: Any) -> str:
    return ",".join(value) if isinstance(value, tuple) else str(value)


def clear_saved(settings: Settings) -> dict[str, str]:
    """Forget the settings `up` saved; returns what was forgotten."""
    path = saved_settings_file(settings)
    forgotten = _read_saved(settings.root)
    path.unlink(missing_ok=True)
    return forgotten


def save(settings: Settings) -> None:
    """Remember the settings that did not come from defaults, for later commands on this stack."""
    chosen = {name: _text(getattr(settings, name)) for name, source in settings.sources.items()
              if source != "default" and name not in _NOT_SAVED and getattr(settings, name) is not None}
    target = saved_settings_file(settings)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    with open_private(tmp) as handle:
        handle.write(json.dumps(chosen, indent=2, sort_keys=True))
    tmp.replace(target)
