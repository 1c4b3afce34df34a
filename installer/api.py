"""The Python API behind the command line and the notebooks.

Each function takes settings as keyword arguments (the same names as the CLI
flags; unset ones come from the environment or the defaults), does its work,
and returns data. Progress goes to an optional callback.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import logfiles, runtime, stack
from .clientconfig import ConnectResult
from .clientconfig import connect as _connect
from .connection import format_connection, read_connection_file, write_connection_file
from .errors import ConfigError, StackError
from .secrets import rotate_secret
from .settings import Settings, resolve
from .stackstatus import StackStatus

Progress = Callable[[stack.Event], None]


def settings(**flags: Any) -> Settings:
    return resolve(flags)


def up(progress: Progress | None = None, **flags: Any) -> StackStatus:
    """Start the stack and return its status once every service is healthy."""
    return stack.up(resolve(flags), progress or (lambda _: None))


def down(progress: Progress | None = None, **flags: Any) -> list[str]:
    """Stop the stack; returns the names of the services that were stopped."""
    return stack.down(resolve(flags), progress or (lambda _: None))


def local_registry(verb: str = "status", **flags: Any) -> str | None:
    """Ask (verb "status") or stop (verb "stop") the local registry the project's scripts started."""
    return runtime.local_registry(resolve(flags).registry, verb)


def status(**flags: Any) -> StackStatus:
    return stack.status(resolve(flags))


def snapshot(**flags: Any) -> Any:
    """Take a snapshot now and publish it; returns the new generation."""
    return stack.take_snapshot(resolve(flags))


def restore(force: bool = False, **flags: Any) -> Any:
    """Restore the newest good snapshot into an empty PGDATA_DIR (or move a non-empty one aside with force)."""
    return stack.restore(resolve(flags), force=force)


def token(**flags: Any) -> str | None:
    """The access token browsers and API clients present; None when access control is off."""
    return stack.access_token(resolve(flags))


def connection(**flags: Any) -> str:
    """The one line (URL and token) a browser or another notebook needs to reach the stack."""
    resolved = resolve(flags)
    saved = read_connection_file(resolved.root)
    if not saved:
        raise StackError("this stack has no connection details yet", hint="run `up` first")
    return saved["connection_string"]


def rotate_token(**flags: Any) -> str:
    """Replace the access token; browsers and notebooks must use the new connection string."""
    resolved = resolve(flags)
    if resolved.no_auth:
        raise ConfigError("access control is off (--no-auth): there is no token to rotate")
    new = rotate_secret(resolved.token_file)
    saved = read_connection_file(resolved.root)
    if saved:
        write_connection_file(resolved.root, saved["url"], new, {"tunnel": saved.get("tunnel", False)})
    return format_connection(saved["url"] if saved else f"http://127.0.0.1:{resolved.port}", new)


def connect(connection: str | None = None, *, url: str | None = None, token: str | None = None,
            profile: str | None = None, root: str | Path | None = None, **options: Any) -> ConnectResult:
    """Point the Metaflow client of this machine at a stack (see installer.clientconfig.connect)."""
    return _connect(connection, url=url, token=token, profile=profile, root=root, **options)


def log_files(service: str | None = None, **flags: Any) -> dict[str, Path]:
    resolved = resolve(flags)
    names = stack.service_names(resolved) + ["tunnel"]
    if service is not None and service not in names:
        raise ConfigError(f"no service named {service!r}", hint=f"one of: {', '.join(names)}")
    return {name: logfiles.readable(resolved.log_path(name), resolved.logs_dir, name)
            for name in names if service in (None, name)}


def config(**flags: Any) -> list[tuple[str, str, str]]:
    return resolve(flags).describe()


def clear_settings(**flags: Any) -> dict[str, str]:
    """Forget the settings `up` saved under MF_ROOT; returns what was forgotten."""
    return stack.forget_settings(resolve(flags))
