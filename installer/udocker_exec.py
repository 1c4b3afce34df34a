"""`udocker run` that becomes the container's proot instead of waiting for it.

    python -m installer.udocker_exec [udocker options] run --containerauth ... CONTAINER CMD...

udocker (a Python program) starts proot as a child and waits for it, so every container of
the stack kept an idle udocker Python beside it (~18 MiB each). This runs udocker's own
command line unchanged and, at the moment udocker would start proot, replaces itself with
proot: same command, same environment, same pid (the one `up` records), one process fewer.

udocker deletes its temporary files once proot exits; a process that is now proot cannot. With
`--containerauth` (the container's own /etc/passwd, which has the users the stack runs as) udocker
makes none; if some are made anyway, udocker waits for proot as usual, so that nothing is left behind.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import udocker.engine.proot as proot_engine
from udocker.maincmd import main as udocker_main
from udocker.utils.fileutil import FileUtil


class _StartProotInPlace(ModuleType):
    """The `subprocess` module as udocker's proot engine sees it, whose `call` is an exec."""

    def __init__(self) -> None:
        super().__init__("subprocess")

    def __getattr__(self, name: str) -> Any:
        return getattr(subprocess, name)

    def call(self, argv: Sequence[str], env: dict[str, str] | None = None, **kwargs: Any) -> int:
        if FileUtil.tmptrash:
            return subprocess.call(argv, env=env, **kwargs)
        sys.stdout.flush()
        sys.stderr.flush()
        # udocker passes env=None after it has set os.environ up itself.
        os.execvpe(argv[0], list(argv), dict(os.environ if env is None else env))
        raise AssertionError("unreachable")  # pragma: no cover


def main() -> None:
    proot_engine.subprocess = _StartProotInPlace()
    sys.argv = ["udocker", *sys.argv[1:]]
    udocker_main()


if __name__ == "__main__":
    main()
