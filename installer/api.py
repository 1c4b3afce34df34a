"""The Python API behind the command line and the notebooks.

Each function takes settings as keyword arguments (the same names as the CLI
flags; unset ones come from the environment or the defaults), does its work,
and returns data. Progress goes to an optional callback.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import stack
from .errors import ConfigError
from .secrets import read_or_create_secret, write_secret
from .settings import Settings, resolve

Progress = Callable[[stack.Event], None]


def settings(**flags: Any) -> Settings:
    return resolve(flags)


def up(progress: Progress | None = None, **flags: Any) -> stack.StackStatus:
    """Start the stack and return its status once every service is healthy."""
    resolved = resolve(flags)
    _apply_token(resolved)
    return stack.up(resolved, progress or (lambda _: None))


def down(progress: Progress | None = None, **flags: Any) -> list[str]:
    """Stop the stack; returns the names of the services that were stopped."""
    return stack.down(resolve(flags), progress or (lambda _: None))


def status(**flags: Any) -> stack.StackStatus:
    return stack.status(resolve(flags))


def token(**flags: Any) -> str | None:
    """The access token browsers and API clients present; None when access control is off."""
    resolved = resolve(flags)
    if resolved.no_auth:
        return None
    return read_or_create_secret(resolved.secrets_dir / "token")


def log_files(service: str | None = None, **flags: Any) -> dict[str, Path]:
    resolved = resolve(flags)
    names = stack.service_names(resolved)
    if service is not None and service not in names:
        raise ConfigError(f"no service named {service!r}", hint=f"one of: {', '.join(names)}")
    return {name: resolved.log_path(name) for name in names if service in (None, name)}


def config(**flags: Any) -> list[tuple[str, str, str]]:
    return resolve(flags).describe()


def _apply_token(resolved: Settings) -> None:
    if resolved.token:
        write_secret(resolved.secrets_dir / "token", resolved.token)
