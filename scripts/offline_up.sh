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
VENV="${MFSTACK_VENV:-$ROOT/.venv}"
# The project lives in $VENV, not in the shell's python: put its command where the shell finds it.
LINK=/usr/local/bin/mfstack
if [[ -w ${LINK%/*} ]] && { [[ ! -e $LINK && ! -L $LINK ]] || [[ -L $LINK && $(readlink "$LINK") == */bin/mfstack ]]; }; then
    ln -sfn "$VENV/bin/mfstack" "$LINK"
fi
CMD="$VENV/bin/mfstack"
[[ $(readlink "$LINK" 2>/dev/null) == "$CMD" ]] && CMD=mfstack
echo
echo "The local registry on 127.0.0.1:$PORT keeps running after \`down\`; \`$CMD down --all\` stops it too."
echo
cd "$ROOT"
status=0
"$VENV/bin/python" -m installer up --registry "http://127.0.0.1:$PORT" "$@" || status=$?
echo
echo "This project's commands: \`$CMD <command>\`, e.g. \`$CMD status\`, \`$CMD down\`;"
echo "for \`python -m installer <command>\` as the README writes them, first run \`. $VENV/bin/activate\` in your shell."
exit "$status"
