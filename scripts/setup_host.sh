#!/usr/bin/env bash
# Prepare a fresh Debian/Ubuntu machine (as root) for running the stack offline and its tests:
# system packages, a virtual environment in .venv with the project and its test tools,
# and the project's images in a local registry on 127.0.0.1.
#
#   MFSTACK_VENV   where the virtual environment goes (default: <repo>/.venv)
set -Eeuo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
VENV="${MFSTACK_VENV:-$ROOT/.venv}"

say() { echo "[setup] $*"; }
[[ "$(id -u)" == 0 ]] || { echo "[setup] run as root (apt-get, buildah and the registry need it)" >&2; exit 1; }

# proot runs the containers; postgresql-15 and chromium are for the tests
# (snapshot tests drive a native server, page tests a real browser, fuse3 mounts the Drive-like test file system).
PACKAGES=(proot buildah docker-registry skopeo debootstrap umoci curl postgresql-15 postgresql-contrib chromium fuse3 libfuse3-3)
missing=()
for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    say "installing system packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # Keep package scripts from starting system services (PostgreSQL, a registry on port 5000).
    policy=/usr/sbin/policy-rc.d
    if [[ ! -e $policy ]]; then printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod +x "$policy"; trap 'rm -f $policy' EXIT; fi
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    say "creating the virtual environment $VENV"
    python3 -m venv "$VENV"
fi
say "installing the project and its test tools into $VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$ROOT[test,notebook]"

"$HERE/build_images.sh"
say "ready"
