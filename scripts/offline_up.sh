#!/usr/bin/env bash
# Bring the stack up on a machine without Docker Hub: build the project's images, serve them
# from a local registry on 127.0.0.1, and run `up` against it.
#
# NOTE: offline, the Metaflow service image (netflixoss/metaflow_metadata_service) cannot be
# fetched. A TEST image built from images/service-standin plays its part, with the same
# contract (commands, ports, paths, environment). PostgreSQL 15 is real. Arguments go to `up`.
set -Eeuo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
PORT="${MFSTACK_REGISTRY_PORT:-5000}"
if "$HERE/setup_host.sh" --check; then
    echo "[setup] already done and current (system packages, .venv, images); skipped"
    "$HERE/local_registry.sh" start
else
    "$HERE/setup_host.sh"
fi
echo
echo "NOTE: using the TEST image mfstack/metaflow-service-standin:test in place of the Metaflow service image."
echo "The local registry on 127.0.0.1:$PORT keeps running after \`down\`; \`python -m installer down --all\` stops it too."
echo
cd "$ROOT"
exec "${MFSTACK_VENV:-$ROOT/.venv}/bin/python" -m installer up \
    --registry "http://127.0.0.1:$PORT" \
    --postgres-image mfstack/postgres:15 \
    --service-image mfstack/metaflow-service-standin:test "$@"
