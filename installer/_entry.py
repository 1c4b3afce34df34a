"""Console-script entry point that makes sure our `installer` package is the one imported.

PyPA's wheel installer is also imported as `installer`; when both are installed
the later one overwrites the other's files and `python -m installer` may run
the wrong program. Fail with a clear message instead.
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


if __name__ == "__main__":
    sys.exit(main())
