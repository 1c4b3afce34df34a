"""`mfstack` / `python -m mfstack`: the command line, reached under a name nobody else uses.

The package is imported as `installer`, a name PyPA's wheel installer uses too;
when both are installed, `python -m installer` may run the wrong program. This
entry point checks which `installer` it got and fails with a clear message.
"""

from __future__ import annotations

import sys


def main() -> int:
    import installer

    if not getattr(installer, "IS_METAFLOW_STACK", False):
        where = getattr(installer, "__file__", "?")
        print(f"error: the module `installer` at {where} is another package (PyPA's wheel installer?), "
              "not the Metaflow stack.\nhint: pip uninstall -y installer metaflow-notebook-stack, then "
              "reinstall metaflow-notebook-stack (or use a virtual environment)", file=sys.stderr)
        return 2
    from installer.cli import main as cli_main

    return cli_main()

