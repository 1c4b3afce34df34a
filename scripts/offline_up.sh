#!/usr/bin/env bash
# Bring the stack up on a machine without Docker Hub: build the production images from the
# upstream release archives (a local mirror folder, see scripts/build_images.sh), serve them
# under their production names from a local registry on 127.0.0.1, and run `up` against it.
# Only --registry differs from what `up` does with internet. Arguments go to `up`.
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
echo "The local registry on 127.0.0.1:$PORT keeps running after \`down\`; \`python -m installer down --all\` stops it too."
echo
cd "$ROOT"
exec "${MFSTACK_VENV:-$ROOT/.venv}/bin/python" -m installer up --registry "http://127.0.0.1:$PORT" "$@"
