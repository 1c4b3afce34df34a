"""A stateful Metaflow service and UI on a disposable machine.

    import installer
    installer.up()          # start everything; returns the stack's status
    installer.status()
    installer.down()
    installer.connect("https://<host>/?token=<token>")   # on another machine
"""

from .api import (config, connect, connection, down, log_files, restore, rotate_token, settings, snapshot, status,
                  token, up)
from .errors import StackError

# Another distribution (PyPA's wheel installer) uses the import name `installer`;
# this marker lets our entry points tell the two apart.
IS_METAFLOW_STACK = True

__all__ = ["StackError", "config", "connect", "connection", "down", "log_files", "restore", "rotate_token",
           "settings", "snapshot", "status", "token", "up"]
