"""A stateful Metaflow service and UI on a disposable machine.

    import installer
    installer.up()          # start everything; returns the stack's status
    installer.status()
    installer.down()
    installer.connect("https://<host>/?token=<token>")   # on another machine
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

# Another distribution (PyPA's wheel installer) uses the import name `installer`;
# this marker lets our entry points tell the two apart.
IS_METAFLOW_STACK = True

__all__ = ["StackError", "config", "connect", "connection", "down", "log_files", "restore", "rotate_token",
           "settings", "snapshot", "status", "token", "up"]

# The stack's long-running helpers (proxy, object store, watcher, monitor) run as
# `python -m installer.<module>`, which imports this package first: importing the API here would load
# all of it (psycopg, requests, ...) into each of them. So the API is loaded on first use.


def _api(name: str) -> Any:
    return getattr(importlib.import_module(".api", __name__), name)


def __getattr__(name: str) -> Any:
    if name == "StackError":
        return importlib.import_module(".errors", __name__).StackError
    if name in __all__:
        return _api(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


def _api_function(name: str) -> property:
    # Importing a module of this package sets it as the package's attribute of that name; for the
    # three API functions named like a module (connection, settings, snapshot), the function wins.
    return property(lambda _: _api(name), lambda _, __: None)


class _Package(types.ModuleType):
    connection = _api_function("connection")
    settings = _api_function("settings")
    snapshot = _api_function("snapshot")


sys.modules[__name__].__class__ = _Package
