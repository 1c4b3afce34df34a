#!/usr/bin/env bash
# Set up everything the tests need on a fresh machine (as root), then run them.
# Extra arguments go to pytest, e.g. scripts/test.sh -k proxy
set -Eeuo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
"$HERE/setup_host.sh"
cd "$ROOT"
exec "${MFSTACK_VENV:-$ROOT/.venv}/bin/python" -m pytest "$@"
